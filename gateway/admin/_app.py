"""The admin API: an aiohttp application served on a Unix socket (default) and/or TCP, inside the gateway's loop.

Every answer is built from a model in `_models.py` (what the OpenAPI document describes); every error is JSON
`{error, detail, issues}` with a 4xx status. Nothing here can return a secret value: the models have no field for
one, the policy view lists credentials by name and injector kind, and a sandbox's token shows as `has_token`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import re
import socket
import stat
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
import pydantic
from aiohttp import web

from ..audit import AuditLog
from ..audit import fields as F
from ..config import GatewayConfig
from ..credentials import CredentialBroker
from ..metrics import GatewayMetrics
from ..policies import PolicyError, PolicyIssue, SandboxConflict, SandboxDTO
from ..registry import PolicyRegistry, ReloadResult
from . import _models as M
from ._auth import bearer_matches, read_token_file, server_ssl_context
from ._openapi import openapi_document

__all__ = ["AdminServer", "AdminStartError", "GatewayControl", "RecentDecisions", "build_app"]

log = logging.getLogger("cube_egress.admin")

MAX_BODY = 64 * 1024  # a registration is a few hundred bytes
RECENT_DECISIONS = 1000
_READY_TIMEOUT_S = 5.0
_ID = re.compile(M.SANDBOX_ID_PATTERN)
_OPEN_PATHS = frozenset({"/v1/health"})
_DECISION_QUERY = frozenset({"limit", "sandbox", "verdict"})


class GatewayControl(Protocol):
    """What the admin API needs from the gateway (`gateway.server.Gateway` provides it)."""

    policies: PolicyRegistry
    metrics: GatewayMetrics
    audit: AuditLog
    broker: CredentialBroker
    ready: asyncio.Event

    def listen_addresses(self) -> list[tuple[str, int]]: ...

    def add_sandbox(self, spec: SandboxDTO, where: str = ..., *, via: str = ..., peer: str | None = ...) -> bool: ...

    async def remove_sandbox(self, sandbox_id: str, *, via: str = ..., peer: str | None = ...) -> int: ...

    def reload_policy(self, *, via: str = ..., peer: str | None = ...) -> ReloadResult: ...


class RecentDecisions:
    """The last `size` decision records, for GET /v1/decisions. Fed by `AuditLog.subscribe` (any thread)."""

    def __init__(self, size: int = RECENT_DECISIONS) -> None:
        self._ring: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def __call__(self, record: Mapping[str, Any]) -> None:
        if record.get(F.EVENT) == F.EVENT_DECISION:
            with self._lock:
                self._ring.append(record)

    def query(self, limit: int, sandbox: str | None = None, verdict: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            records = list(self._ring)
        out: list[dict[str, Any]] = []
        for r in reversed(records):
            if (sandbox is None or r.get(F.SANDBOX) == sandbox) and (verdict is None or r.get(F.VERDICT) == verdict):
                out.append(dict(r))
                if len(out) >= limit:
                    break
        return out


# -- answers --------------------------------------------------------------------------------------------------


def _json(model: pydantic.BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(model.model_dump(mode="json")), status=status, content_type="application/json"
    )


class _Fail(Exception):
    """A handler's refusal: status, code, detail and the issues behind it."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        issues: list[M.IssueView] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.issues, self.headers = issues or [], dict(headers or {})


def _error(status: int, error: str, detail: str, issues: list[M.IssueView], headers: Mapping[str, str]) -> web.Response:
    resp = _json(M.ErrorBody(error=error, detail=detail, issues=issues), status)
    resp.headers.update(headers)
    return resp


def _issue_views(issues: tuple[PolicyIssue, ...]) -> list[M.IssueView]:
    return [M.IssueView(location=str(i.position), message=i.message, rule=i.rule_id, hint=i.hint) for i in issues]


def _validation_issues(e: pydantic.ValidationError, prefix: str) -> list[M.IssueView]:
    # `msg` never includes the input value (a token must not be echoed back); `loc` names the field.
    return [
        M.IssueView(location=".".join([prefix, *(str(p) for p in err["loc"])]), message=err["msg"])
        for err in e.errors(include_input=False, include_url=False)
    ]


# -- the application ------------------------------------------------------------------------------------------


def build_app(gateway: GatewayControl, recent: RecentDecisions, token: bytes | None) -> web.Application:
    """The aiohttp application. `token`: the bearer token TCP clients must send (None: TCP needs no token, which
    the server only allows together with mTLS). Clients on the Unix socket never need one."""

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            resp = await handler(request)
        except _Fail as f:
            resp = _error(f.status, f.error, f.detail, f.issues, f.headers)
        except web.HTTPException as e:  # aiohttp's own: 404 no route, 405 (with Allow), 413 body too large...
            headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
            resp = _error(e.status, e.reason.lower().replace(" ", "_"), e.reason, [], headers)
        except Exception:
            log.exception("admin API handler %s failed", route)
            resp = _error(500, "internal", "the gateway failed to answer; see its log", [], {})
        gateway.metrics.count_admin_request(route, resp.status)
        return resp

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in _OPEN_PATHS or token is None or _on_unix_socket(request):
            return await handler(request)
        if not bearer_matches(request.headers.get("Authorization"), token):
            raise _Fail(
                401,
                "unauthorized",
                "send 'Authorization: Bearer <token>' with the token of the admin token_file",
                headers={"WWW-Authenticate": 'Bearer realm="cube-egress admin"'},
            )
        return await handler(request)

    async def health(request: web.Request) -> web.Response:
        return _json(M.Health())

    async def ready(request: web.Request) -> web.Response:
        policy = gateway.policies.policy
        checks = [M.CheckView(name="policy", ok=True, detail=f"{policy.policy_hash[:12]} ({policy.rule_count} rules)")]
        listening = gateway.listen_addresses() if gateway.ready.is_set() else []
        checks.append(
            M.CheckView(
                name="proxy",
                ok=bool(listening),
                detail=", ".join(f"{h}:{p}" for h, p in listening) if listening else "the proxy is not listening",
            )
        )
        try:
            problems = await asyncio.wait_for(gateway.broker.check_policy(policy), _READY_TIMEOUT_S)
        except TimeoutError:
            problems = [f"the secret store did not answer within {_READY_TIMEOUT_S:.0f}s"]
        checks.append(
            M.CheckView(
                name="secrets",
                ok=not problems,
                detail="; ".join(problems) if problems else "every static credential of the policy is servable",
            )
        )
        ok = all(c.ok for c in checks)
        return _json(M.Readiness(ready=ok, checks=checks), 200 if ok else 503)

    def view(sandbox_id: str) -> M.SandboxView:
        policy = gateway.policies.policy
        sb = policy.sandboxes.get(sandbox_id)
        if sb is None:
            raise _Fail(404, "not_found", f"no sandbox {sandbox_id!r}")
        return M.SandboxView(
            id=sb.id,
            origin="file" if sb.id in gateway.policies.file_policy.sandboxes else "api",
            labels=dict(sb.labels),
            sources=[str(n) for n in sb.sources],
            policies=list(sb.policies),
            default_mode="report" if str(sb.default_mode) == "report" else "enforce",
            has_token=sb.token_sha256 is not None,
        )

    def path_id(request: web.Request) -> str:
        sandbox_id = request.match_info["id"]
        if len(sandbox_id) > M.MAX_SANDBOX_ID or not _ID.match(sandbox_id):
            raise _Fail(
                422,
                "invalid_id",
                f"a sandbox id is 1-{M.MAX_SANDBOX_ID} characters matching {M.SANDBOX_ID_PATTERN}",
            )
        return sandbox_id

    async def list_sandboxes(request: web.Request) -> web.Response:
        ids = sorted(gateway.policies.policy.sandboxes)
        return _json(M.SandboxList(sandboxes=[view(i) for i in ids]))

    async def get_sandbox(request: web.Request) -> web.Response:
        return _json(view(path_id(request)))

    async def put_sandbox(request: web.Request) -> web.Response:
        sandbox_id = path_id(request)
        if request.content_type != "application/json":
            raise _Fail(415, "unsupported_media_type", "send the registration as application/json")
        raw = await request.read()  # bounded by client_max_size (413 beyond it)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _Fail(400, "bad_json", f"the body is not JSON: {e.msg}") from None
        try:
            reg = M.SandboxRegistration.model_validate(body)
        except pydantic.ValidationError as e:
            raise _Fail(
                422, "invalid_registration", "the registration is invalid", _validation_issues(e, "body")
            ) from None
        fields = reg.model_dump(exclude={"token"})
        secret: pydantic.SecretStr | None = getattr(reg, "token", None)
        if secret is not None:
            if fields.get("token_sha256") is not None:
                raise _Fail(422, "invalid_registration", "give 'token' or 'token_sha256', not both")
            # Hashed here and forgotten: only the digest reaches the policy and sandboxes.json.
            fields["token_sha256"] = hashlib.sha256(secret.get_secret_value().encode("utf-8")).hexdigest()
        try:
            spec = SandboxDTO.model_validate({**fields, "id": sandbox_id})
        except pydantic.ValidationError as e:
            raise _Fail(
                422, "invalid_registration", "the registration is invalid", _validation_issues(e, "body")
            ) from None
        try:
            created = gateway.add_sandbox(
                spec, f"PUT /v1/sandboxes/{sandbox_id}", via=F.VIA_ADMIN_API, peer=_peer(request)
            )
        except SandboxConflict as e:
            raise _Fail(
                409, "conflict", "the registration clashes with another sandbox", _issue_views(e.issues)
            ) from None
        except PolicyError as e:
            raise _Fail(422, "invalid_registration", "the registration is invalid", _issue_views(e.issues)) from None
        return _json(view(sandbox_id), 201 if created else 200)

    async def delete_sandbox(request: web.Request) -> web.Response:
        sandbox_id = path_id(request)
        if sandbox_id in gateway.policies.file_policy.sandboxes:
            raise _Fail(
                409, "defined_in_file", f"sandbox {sandbox_id!r} is defined in a policy file; edit it and reload"
            )
        try:
            revoked = await gateway.remove_sandbox(sandbox_id, via=F.VIA_ADMIN_API, peer=_peer(request))
        except LookupError:
            raise _Fail(404, "not_found", f"no registered sandbox {sandbox_id!r}") from None
        return _json(M.UnregisterView(id=sandbox_id, leases_revoked=revoked))

    async def reload(request: web.Request) -> web.Response:
        result = gateway.reload_policy(via=F.VIA_ADMIN_API, peer=_peer(request))
        if not result.ok:
            raise _Fail(
                422,
                "invalid_policy",
                f"the policy files are invalid; {result.policy_hash[:12]} stays in force",
                _issue_views(result.issues),
            )
        return _json(
            M.ReloadView(
                policy_hash=result.policy_hash,
                rule_count=result.rule_count,
                sandboxes=len(gateway.policies.policy.sandboxes),
            )
        )

    async def get_policy(request: web.Request) -> web.Response:
        policy = gateway.policies.policy
        return _json(
            M.PolicyView(
                policy_hash=policy.policy_hash,
                files=list(policy.files),
                rule_count=policy.rule_count,
                policies={name: [r.id for r in rules] for name, rules in sorted(policy.rules_by_policy.items())},
                credentials=[
                    M.CredentialView(name=c.name, injector=c.kind)
                    for c in sorted(policy.credentials.values(), key=lambda c: c.name)
                ],
                sandboxes=len(policy.sandboxes),
            )
        )

    async def decisions(request: web.Request) -> web.Response:
        q = request.query
        issues: list[M.IssueView] = []
        for key in sorted(set(q)):
            if key not in _DECISION_QUERY:
                issues.append(M.IssueView(location=f"query.{key}", message="unknown query parameter"))
            elif len(q.getall(key)) > 1:
                issues.append(M.IssueView(location=f"query.{key}", message="given more than once"))
        limit = 100
        if "limit" in q:
            text = q["limit"]
            if not (text.isascii() and text.isdigit() and 1 <= int(text) <= RECENT_DECISIONS):
                issues.append(M.IssueView(location="query.limit", message=f"an integer from 1 to {RECENT_DECISIONS}"))
            else:
                limit = int(text)
        sandbox = q.get("sandbox")
        if sandbox is not None and (len(sandbox) > M.MAX_SANDBOX_ID or not _ID.match(sandbox)):
            issues.append(M.IssueView(location="query.sandbox", message="not a sandbox id"))
        verdict = q.get("verdict")
        if verdict is not None and verdict not in ("allow", "deny"):
            issues.append(M.IssueView(location="query.verdict", message="'allow' or 'deny'"))
        if issues:
            raise _Fail(422, "invalid_query", "a query parameter is invalid", issues)
        return _json(M.DecisionList(decisions=recent.query(limit, sandbox, verdict)))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = gateway.metrics.exposition()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(openapi_document()), content_type="application/json")

    app = web.Application(middlewares=[errors, auth], client_max_size=MAX_BODY)
    app.router.add_get("/v1/health", health, allow_head=False)
    app.router.add_get("/v1/ready", ready, allow_head=False)
    app.router.add_get("/v1/sandboxes", list_sandboxes, allow_head=False)
    app.router.add_get("/v1/sandboxes/{id}", get_sandbox, allow_head=False)
    app.router.add_put("/v1/sandboxes/{id}", put_sandbox)
    app.router.add_delete("/v1/sandboxes/{id}", delete_sandbox)
    app.router.add_post("/v1/policy/reload", reload)
    app.router.add_get("/v1/policy", get_policy, allow_head=False)
    app.router.add_get("/v1/decisions", decisions, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/v1/openapi.json", openapi, allow_head=False)
    return app


def _on_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _peer(request: web.Request) -> str:
    """Who made an audited change: "unix", or the TCP client's "ip:port" (as audit records write addresses)."""
    if _on_unix_socket(request):
        return "unix"
    peername = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return request.remote or "unknown"


# -- serving --------------------------------------------------------------------------------------------------


class AdminStartError(RuntimeError):
    """The admin API could not listen (socket path in use by a live gateway, port taken, ...)."""


def _bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from the start (no window where others could connect).

    A stale socket file (nothing accepts on it) is replaced; a live one means another gateway: refuse. Paths longer
    than sun_path allows are bound through /proc/self/fd/<directory fd>/<name>."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise AdminStartError(f"admin socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(path) as short:
                probe.connect(short)
        except OSError:
            os.unlink(path)  # stale: left by a gateway that did not stop cleanly
        else:
            raise AdminStartError(f"another process serves the admin API at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the socket inode's mode (less umask): set it before bind, not after.
        os.fchmod(sock.fileno(), 0o600)
        with _short_path(path) as short:
            sock.bind(short)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise AdminStartError(f"cannot listen on admin socket {path}: {e.strerror}") from e
    return sock


@contextlib.contextmanager
def _short_path(path: str) -> Any:
    if len(os.fsencode(path)) < 100:
        yield path
        return
    dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dfd}/{os.path.basename(path)}"
    finally:
        os.close(dfd)


class AdminServer:
    """The admin API's listeners, started and stopped with the gateway. Also an async context manager."""

    def __init__(self, gateway: GatewayControl, config: GatewayConfig) -> None:
        """Raises AdminAuthError (a ValueError) when the TCP credentials are unsafe: before anything listens."""
        self.config = config.admin
        self.socket_path = config.admin_socket
        tcp = self.config.tcp
        self._token = read_token_file(self.config.token_file) if self.config.token_file else None
        self._ssl = server_ssl_context(self.config.tls) if self.config.tls is not None else None
        if tcp is not None and self._token is None and self._ssl is None:  # the config validator forbids it too
            raise ValueError("admin tcp needs token_file or tls")
        self.recent = RecentDecisions()
        gateway.audit.subscribe(self.recent)
        self.app = build_app(gateway, self.recent, self._token)
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self._sock_ino: int | None = None
        self.addresses: list[str] = []

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=log, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            if self.socket_path is not None:
                self._sock = _bind_unix(self.socket_path)
                self._sock_ino = os.stat(self.socket_path).st_ino
                await web.SockSite(runner, self._sock).start()
                self.addresses.append(f"unix:{self.socket_path}")
            tcp = self.config.tcp
            if tcp is not None:
                try:
                    await web.TCPSite(runner, tcp.host, tcp.port, ssl_context=self._ssl, reuse_address=True).start()
                except OSError as e:
                    raise AdminStartError(
                        f"cannot listen for the admin API on {tcp.host}:{tcp.port}: {e.strerror}"
                    ) from e
                self.addresses.append(f"{'https' if self._ssl else 'http'}://{tcp.host}:{tcp.port}")
        except BaseException:
            await self.stop()
            raise
        log.info("admin API on %s", ", ".join(self.addresses))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            # Remove our socket file only (a restarted gateway may already have replaced it).
            with contextlib.suppress(OSError):
                if self.socket_path is not None and os.stat(self.socket_path).st_ino == self._sock_ino:
                    os.unlink(self.socket_path)

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
