"""A VM's sandbox registered with the gateway through its admin API, for as long as the VM's tap exists.

:class:`GatewayRegistration` is a :class:`~hypervisor.net.SandboxHook`: when a VM's tap comes up it registers the
VM's sandbox id with the guest's address as its only source (`PUT /v1/sandboxes/{id}`), so the gateway identifies
the guest's traffic by address, applies the named policies, and leases dynamic secrets for this sandbox alone;
before the tap goes it unregisters it (`DELETE`), which revokes those leases. A clone registers under its own
sandbox id, so clones of one template never share a lease or a usage-limit session.

The admin API is reached over its Unix socket (the default, no token) or TCP with a bearer token read from a 0600
file. Nothing here ever sees a secret: a registration carries names and addresses only.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from ._errors import VMError
from .net import SandboxLink

__all__ = ["GatewayRegistration"]


class GatewayRegistration:
    """Register each VM's sandbox with the gateway (``sandbox_up``) and unregister it (``sandbox_down``)."""

    def __init__(
        self,
        *,
        policies: Sequence[str],
        unix_socket: str | Path | None = None,
        url: str | None = None,
        token_file: str | Path | None = None,
        labels: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if (unix_socket is None) == (url is None):
            raise ValueError("GatewayRegistration: give the admin API's unix_socket or its url (one of them)")
        if not policies:
            raise ValueError("GatewayRegistration: name at least one policy for the sandboxes")
        self.policies = list(policies)
        self.labels = dict(labels or {})
        self._unix_socket = str(unix_socket) if unix_socket is not None else None
        self._base = url.rstrip("/") if url is not None else "http://admin"
        self._headers = {"Content-Type": "application/json"}
        if token_file is not None:
            self._headers["Authorization"] = f"Bearer {_read_token(Path(token_file))}"
        self._timeout = timeout_s

    def _client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self._unix_socket) if self._unix_socket else None
        return httpx.Client(base_url=self._base, transport=transport, timeout=self._timeout, headers=self._headers)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            with self._client() as client:
                return client.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise VMError(f"gateway admin API {method} {path}: {type(e).__name__}: {e}") from e

    def sandbox_up(self, link: SandboxLink) -> None:
        body = {
            "sources": [f"{link.ip}/32"],
            "policies": self.policies,
            "labels": {**self.labels, "vm": link.vm_id},
        }
        r = self._call("PUT", f"/v1/sandboxes/{link.sandbox_id}", body)
        if r.status_code not in (200, 201):
            raise VMError(f"the gateway refused sandbox {link.sandbox_id}: {r.status_code} {_problem(r)}")

    def sandbox_down(self, link: SandboxLink) -> None:
        r = self._call("DELETE", f"/v1/sandboxes/{link.sandbox_id}")
        if r.status_code not in (200, 404):  # 404: already gone (e.g. the gateway restarted without it)
            raise VMError(f"unregistering sandbox {link.sandbox_id} failed: {r.status_code} {_problem(r)}")


def _read_token(path: Path) -> str:
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: the admin token file must not be readable by group or others (chmod 600)")
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path}: the admin token file is empty")
    return token


def _problem(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:200]
    issues = doc.get("issues") or []
    detail = doc.get("detail") or doc.get("error") or ""
    more = "; ".join(str(i.get("message", i)) if isinstance(i, dict) else str(i) for i in issues[:5])
    return f"{detail}{': ' + more if more else ''}"

