"""`cube-egress`: run the gateway, and check, explain, test and replay policies.

Exit codes: 0 success; 1 a policy error or a failed expectation; 2 bad usage or an unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal

import orjson
import pydantic
import yaml

from .config import ConfigError, GatewayConfig, default_config, load_config
from .policies import (
    CompiledPolicy,
    Decision,
    PolicyError,
    PolicyIssue,
    Scheme,
    facts_from_url,
    load_policy,
)

__all__ = ["main"]


def _print_issues(issues: Sequence[PolicyIssue]) -> None:
    for issue in issues:
        print(str(issue), file=sys.stderr)


# -- run -------------------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from .server import Gateway, GatewayStartError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    try:
        config: GatewayConfig = load_config(args.config) if args.config else default_config()
        if args.listen:
            host, _, port = args.listen.rpartition(":")
            config = config.model_copy(
                update={"listen": config.listen.model_copy(update={"host": host, "port": int(port)})}
            )
        gateway = Gateway(config)
    except PolicyError as e:  # before ValueError, which it is: a broken policy is exit 1 like `policy check`
        _print_issues(e.issues)
        return 1
    except (ConfigError, OSError, ValueError) as e:
        print(f"cube-egress: {e}", file=sys.stderr)
        return 2
    policy = gateway.state.policy
    log = logging.getLogger("cube_egress")
    if config.secrets is not None and config.secrets.backend == "file":
        log.warning("secret store: file %s (DEVELOPMENT ONLY; use Vault/OpenBao in production)", config.secrets.path)
    log.info(
        "cube-egress %s proxy on %s:%d; policy %s (%d rules, %d sandboxes); CA certificate %s; audit %s",
        config.mode,
        config.listen.host,
        config.listen.port,
        policy.policy_hash[:12],
        policy.rule_count,
        len(policy.sandboxes),
        gateway.ca_cert_path,
        config.audit_path,
    )

    async def main() -> None:
        task = asyncio.create_task(gateway.run())
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gateway.shutdown)
        await task

    try:
        asyncio.run(main())
    except GatewayStartError as e:
        print(f"cube-egress: {e}", file=sys.stderr)
        return 1
    return 0


# -- policy check / explain / test ----------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    warnings: list[PolicyIssue] = []
    try:
        policy = load_policy(args.files, warnings=warnings)
    except PolicyError as e:
        _print_issues(e.issues)
        print(f"{len(e.issues)} error(s)", file=sys.stderr)
        return 1
    _print_issues(warnings)
    print(
        f"ok: {len(policy.files)} file(s), {policy.rule_count} rule(s), {len(policy.sandboxes)} sandbox(es), "
        f"policy {policy.policy_hash[:12]}"
    )
    return 0


def _decision_dict(d: Decision) -> dict[str, Any]:
    return {
        "verdict": str(d.verdict),
        "mode": str(d.mode),
        "rule": d.rule_id,
        "reason": str(d.reason),
        "credential": d.credential.name if d.credential else None,
        "sandbox": d.sandbox_id,
        "policy_hash": d.policy_hash,
    }


def _explain(
    policy: CompiledPolicy, sandbox: str, method: str, url: str, headers: list[tuple[str, str]]
) -> dict[str, Any]:
    from .policies import Identity

    identity = Identity(sandbox, "explain")
    request = policy.decide(identity, facts_from_url(method, url, headers))
    connection = policy.decide(identity, facts_from_url(None, url))
    out = _decision_dict(request)
    out["passes"] = not request.blocks
    facts = facts_from_url(None, url)
    if facts.scheme is Scheme.HTTP:
        handling = "per-request"  # plain HTTP is always judged request by request
    elif connection.blocks:
        handling = "refused"
    elif facts.scheme is Scheme.TCP:
        handling = "tunnel"
    else:
        handling = "intercepted" if connection.intercept else "spliced"
    out["connection"] = {
        "verdict": str(connection.verdict),
        "rule": connection.rule_id,
        "reason": str(connection.reason),
        "handling": handling,
    }
    # The usage limits the request counts against (the counting itself happens in the running gateway).
    out["limits"] = [
        {
            "subject": str(limit.subject),
            "name": limit.name,
            "scope": str(limit.scope),
            "requests_per_minute": limit.requests_per_minute,
            "bytes_per_session": limit.bytes_per_session,
            "mode": str(limit.mode),
        }
        for limit in (policy.limits_for(sandbox, request.credential) if not request.blocks else ())
    ]
    return out


def _parse_headers(raw: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for h in raw:
        name, sep, value = h.partition(":")
        if not sep:
            raise ValueError(f"header {h!r} must be 'Name: value'")
        out.append((name.strip(), value.strip()))
    return out


def _cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        _print_issues(e.issues)
        return 1
    if args.sandbox not in policy.sandboxes:
        print(
            f"cube-egress: unknown sandbox {args.sandbox!r} (known: {', '.join(sorted(policy.sandboxes))})",
            file=sys.stderr,
        )
        return 2
    try:
        out = _explain(policy, args.sandbox, args.method, args.url, _parse_headers(args.header))
    except ValueError as e:
        print(f"cube-egress: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"{args.method.upper()} {args.url} from sandbox {args.sandbox}")
        print(f"  verdict:    {out['verdict']} ({out['mode']}){'' if out['passes'] else ' -> 403'}")
        print(f"  rule:       {out['rule'] or '(none)'}")
        print(f"  reason:     {out['reason']}")
        print(f"  credential: {out['credential'] or '(none)'}")
        print(f"  connection: {out['connection']['handling']}")
        for limit in out["limits"]:
            numbers = ", ".join(
                f"{k} {limit[k]}" for k in ("requests_per_minute", "bytes_per_session") if limit[k] is not None
            )
            print(f"  limit:      {limit['subject']} {limit['name']} ({limit['scope']}, {limit['mode']}): {numbers}")
        print(f"  policy:     {out['policy_hash'][:12]}")
    return 0


class _Expect(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    verdict: str | None = None
    rule: str | None = None
    reason: str | None = None
    mode: str | None = None
    credential: str | None = None
    connection: str | None = None  # refused | spliced | intercepted


class _Case(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    sandbox: str
    method: str = "GET"
    url: str
    headers: dict[str, str] = pydantic.Field(default_factory=dict)
    expect: _Expect


class _Cases(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    version: Literal[1]
    policy: list[str]
    cases: list[_Case]


def _cmd_replay(args: argparse.Namespace) -> int:
    # Its own exit codes (1 means "the decisions change"): see gateway/replay.py.
    from .replay import run

    return run(args.audit, args.policy, output=args.format, fail_on=args.fail_on)


def _cmd_test(args: argparse.Namespace) -> int:
    failures = 0
    total = 0
    for path in args.cases:
        try:
            with open(path, encoding="utf-8") as f:
                suite = _Cases.model_validate(yaml.safe_load(f))
        except (OSError, yaml.YAMLError, pydantic.ValidationError) as e:
            print(f"{path}: cannot read test cases: {e}", file=sys.stderr)
            return 2
        base = os.path.dirname(os.path.abspath(path))
        try:
            policy = load_policy([os.path.join(base, p) for p in suite.policy])
        except PolicyError as e:
            _print_issues(e.issues)
            return 1
        for case in suite.cases:
            total += 1
            if case.sandbox not in policy.sandboxes:
                # Otherwise a misspelt sandbox "passes" every case that expects a deny.
                print(f"FAIL {case.name}: unknown sandbox {case.sandbox!r}")
                failures += 1
                continue
            try:
                got = _explain(policy, case.sandbox, case.method, case.url, list(case.headers.items()))
            except ValueError as e:
                print(f"FAIL {case.name}: {e}")
                failures += 1
                continue
            got_flat = {**got, "connection": got["connection"]["handling"]}
            diffs = [
                (key, want, got_flat.get(key))
                # Keys the case spells out, so `rule: null` asserts that no rule matched.
                for key, want in case.expect.model_dump(include=case.expect.model_fields_set).items()
                if got_flat.get(key) != want
            ]
            if diffs:
                failures += 1
                print(f"FAIL {case.name}: {case.method} {case.url} (sandbox {case.sandbox})")
                for key, want, actual in diffs:
                    print(f"  - expected {key}: {want}")
                    print(f"  + actual   {key}: {actual}")
            elif args.verbose:
                print(f"ok   {case.name}")
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube-egress", description="Egress security gateway for AI-agent sandboxes.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway (embedded development default without --config)")
    run.add_argument("--config", help="gateway config file (YAML, version 1)")
    run.add_argument("--listen", help="override the listen address, HOST:PORT")
    run.set_defaults(func=_cmd_run)

    pol = sub.add_parser("policy", help="check, explain and test policy files")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    check = psub.add_parser("check", help="validate policy files; every error with file:line:col")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=_cmd_check)
    explain = psub.add_parser("explain", help="show the decision for one request")
    explain.add_argument("--policy", nargs="+", required=True)
    explain.add_argument("--sandbox", required=True)
    explain.add_argument("--method", default="GET")
    explain.add_argument("--url", required=True)
    explain.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=_cmd_explain)
    test = psub.add_parser("test", help="check expected decisions (for a policy repository's CI)")
    test.add_argument("cases", nargs="+")
    test.add_argument("-v", "--verbose", action="store_true")
    test.set_defaults(func=_cmd_test)
    replay = psub.add_parser(
        "replay",
        help="re-decide recorded requests under a proposed policy and print what changes "
        "(exit 0 no change, 1 changes, 2 error)",
    )
    replay.add_argument("--audit", nargs="+", required=True, metavar="FILE", help="audit log file(s)")
    replay.add_argument("--policy", nargs="+", required=True, metavar="FILE", help="the proposed policy files")
    replay.add_argument("--format", choices=["text", "json"], default="text")
    replay.add_argument(
        "--fail-on",
        choices=["any", "denied"],
        default="any",
        help="what makes the exit code 1: any change (default), or only newly denied requests",
    )
    replay.set_defaults(func=_cmd_replay)

    from ebpf.cli import add_parser as add_sandbox_parser  # kernel enforcement; bcc is imported only when used

    add_sandbox_parser(sub)
    from .audit.cli import add_parser as add_audit_parser  # audit verify | pubkey (and export)

    add_audit_parser(sub)
    from hypervisor.cli import add_parser as add_hypervisor_parser  # image build, vm ..., demo

    add_hypervisor_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
