"""Who may use the admin API.

- Unix socket: the socket file is 0600 and owned by the gateway's user; reaching it at all is the authentication.
- TCP: `Authorization: Bearer <token>`, compared in constant time with the content of `token_file`, which must not
  be readable by group or others (the gateway refuses to start otherwise), and/or mTLS: the server requires a
  client certificate that chains to `client_ca`.

`/v1/health` is open (liveness probes carry no credentials); everything else needs the above. The token never
appears in a log line, an error or an answer.
"""

from __future__ import annotations

import hmac
import os
import ssl
import stat

from ..config import AdminTlsConfig

__all__ = ["AdminAuthError", "bearer_matches", "read_token_file", "server_ssl_context"]

_MIN_TOKEN = 16


class AdminAuthError(ValueError):
    """The admin API's credentials are not safe to serve with (token file readable by others, too short, ...)."""


def read_token_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise AdminAuthError(f"admin token_file {path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file we read, not of whatever the path names a moment later
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AdminAuthError(
                f"admin token_file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        if not stat.S_ISREG(st.st_mode):
            raise AdminAuthError(f"admin token_file {path} is not a regular file")
        token = os.read(fd, 4097).strip()
    finally:
        os.close(fd)
    if len(token) < _MIN_TOKEN or len(token) > 4096:
        raise AdminAuthError(f"admin token_file {path}: the token must be {_MIN_TOKEN} to 4096 characters")
    return token


def bearer_matches(header: str | None, token: bytes) -> bool:
    """Does an Authorization header carry exactly `token`? Constant time in the token's content."""
    if header is None:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token)


def server_ssl_context(tls: AdminTlsConfig) -> ssl.SSLContext:
    """TLS 1.2+ with a client certificate required (mTLS)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.client_ca)
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise AdminAuthError(f"admin tls: cannot load certificate, key or client CA: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
