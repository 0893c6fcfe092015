"""The addon's response side on real mitmproxy flow objects (no network): echo redaction when the upstream
compresses its answer anyway, and header echoes counted once."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

from mitmproxy.test import tflow

from gateway.addon import EgressAddon, GatewayState, _FlowInfo
from gateway.audit import AuditLog
from gateway.config import ResolverConfig
from gateway.injectors._echo import EchoRedactor, needles_for
from gateway.policies import Identity, facts_from_url, load_policy
from gateway.resolver import Resolver

SECRET = "sk-unit-echo-0123456789abcdef"
POLICY = Path(__file__).parents[1] / "policies" / "fixtures" / "decide.yaml"


def _addon() -> EgressAddon:
    policy = load_policy([str(POLICY)])
    return EgressAddon(GatewayState(policy, Resolver(ResolverConfig()), AuditLog(None), transparent=False))


def _flow(body: bytes, headers: dict[str, str]) -> tuple[object, _FlowInfo]:
    policy = load_policy([str(POLICY)])
    decision = policy.decide(Identity("sb", "t"), facts_from_url("GET", "https://api.github.com/user"))
    info = _FlowInfo(decision, facts_from_url("GET", "https://api.github.com/user"))
    info.stream = EchoRedactor(needles_for([SECRET]))
    info.fingerprint = "f" * 32
    flow = tflow.tflow(resp=True)
    flow.response.headers.clear()
    for k, v in headers.items():
        flow.response.headers[k] = v
    flow.response.raw_content = body
    flow.metadata["cube_egress"] = info
    return flow, info


def test_compressed_echo_is_decoded_redacted_and_reencoded() -> None:
    addon = _addon()
    flow, info = _flow(gzip.compress(b'{"auth": "Bearer ' + SECRET.encode() + b'"}'), {"Content-Encoding": "gzip"})
    addon.responseheaders(flow)  # type: ignore[arg-type]
    assert info.buffered and flow.response.stream is False  # type: ignore[attr-defined]
    asyncio.run(addon.response(flow))  # type: ignore[arg-type]
    assert flow.response.headers["content-encoding"] == "gzip"  # type: ignore[attr-defined]
    decoded = flow.response.get_content()  # type: ignore[attr-defined]
    assert SECRET.encode() not in decoded and b"Bearer ***" in decoded
    assert SECRET.encode() not in gzip.decompress(flow.response.raw_content)  # type: ignore[attr-defined]
    assert info.stream.hits == 1


def test_header_echo_counted_once_and_body_streamed() -> None:
    addon = _addon()
    flow, info = _flow(b"", {"X-Echo": f"Bearer {SECRET}", "Content-Type": "text/event-stream"})
    addon.responseheaders(flow)  # type: ignore[arg-type]
    assert SECRET not in flow.response.headers["x-echo"]  # type: ignore[attr-defined]
    assert info.header_redactions == 1 and info.stream.hits == 0
    assert flow.response.stream is info.stream  # type: ignore[attr-defined]
