"""Realistic, deterministic policy files of any size, and the queries (hits and misses) to ask them.

Every block of 20 rules has the same mix, so a 10-rule file and a 10,000-rule file differ in size, not in shape:

    10 exact-host allows (1-3 hosts each, no conditions: spliced)     3 wildcard allows (`*.orgN.example-cdn.net`)
     2 method/path-conditioned allows (an API host)                   1 second conditioned allow on that API host
     1 DELETE deny on that API host                                   1 deny of paste/tunnel hosts (exact + wildcard)
     1 credential rule (POST + paths + a header condition)            1 CIDR rule (even blocks) or a report-mode deny

The first ten rules of a file are one of each kind, so even the 10-rule file has the whole mix. Rules are spread
over policies of 50 rules; the benchmark sandbox uses all of them, two other sandboxes use subsets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Slot order inside a block: the first ten are one of each kind.
_SLOT_ORDER = (0, 10, 13, 15, 16, 17, 18, 19, 14, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12)
_SERVICES = ("api", "www", "cdn", "auth", "static", "registry", "files", "login", "uploads", "docs")
_WORDS = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell", "cyberdyne",
    "soylent", "aperture", "massive", "gringotts", "oscorp", "vandelay", "dunder", "prestige", "monarch", "nakatomi",
)  # fmt: skip
_POLICY_SIZE = 50
_CREDENTIALS = 7


@dataclass
class PolicySpec:
    """What a generated file contains, for building queries with known answers."""

    n_rules: int
    exact_hosts: list[str] = field(default_factory=list)
    wildcard_suffixes: list[str] = field(default_factory=list)
    api_hosts: list[str] = field(default_factory=list)  # conditioned allow + DELETE deny (+ report deny)
    git_hosts: list[str] = field(default_factory=list)  # conditioned allow only
    deny_hosts: list[str] = field(default_factory=list)
    credential_hosts: list[str] = field(default_factory=list)
    cidr_prefixes: list[str] = field(default_factory=list)  # "10.a.b." of each /24
    policies: list[str] = field(default_factory=list)


def _org(rng: random.Random, block: int) -> str:
    return f"{rng.choice(_WORDS)}{block}"


def _rule(i: int, block: int, slot: int, rng: random.Random, spec: PolicySpec) -> dict[str, Any]:
    org = _org(rng, block)
    api_host = f"api.{_WORDS[block % len(_WORDS)]}{block}.io"  # shared by slots 13, 15, 16, 19 of a block
    rid = f"r{i:05d}"
    if slot < 10:
        hosts = [f"{rng.choice(_SERVICES)}-{i}.{org}.com" for _ in range(rng.randint(1, 3))]
        hosts = list(dict.fromkeys(hosts))
        spec.exact_hosts.extend(hosts)
        return {"id": f"{rid}-exact", "action": "allow", "hosts": hosts}
    if slot < 13:
        suffix = f"{org}-{i}.example-cdn.net"
        spec.wildcard_suffixes.append(suffix)
        return {"id": f"{rid}-wildcard", "action": "allow", "hosts": [f"*.{suffix}"]}
    if slot == 13:
        spec.api_hosts.append(api_host)
        return {
            "id": f"{rid}-api-read",
            "action": "allow",
            "hosts": [api_host],
            "methods": ["GET", "HEAD"],
            "paths": [{"prefix": "/v1/"}],
        }
    if slot == 14:
        git_host = f"git.{org}-{i}.dev"
        spec.git_hosts.append(git_host)
        return {
            "id": f"{rid}-git",
            "action": "allow",
            "hosts": [git_host],
            "methods": ["GET", "POST"],
            "paths": ["/*/*.git/info/refs", "/*/*.git/git-upload-pack"],
        }
    if slot == 15:
        return {
            "id": f"{rid}-api-issues",
            "action": "allow",
            "hosts": [api_host],
            "methods": ["POST", "PATCH"],
            "paths": ["/repos/*/*/issues", "/repos/*/*/issues/*/comments"],
        }
    if slot == 16:
        return {"id": f"{rid}-api-no-delete", "action": "deny", "hosts": [api_host], "methods": ["DELETE"]}
    if slot == 17:
        drop = f"drop{i}.paste-{org}.org"
        spec.deny_hosts.append(drop)
        return {
            "id": f"{rid}-deny-drop",
            "action": "deny",
            "hosts": [drop, f"*.tunnel{i}.example-ngrok.io"],
            "schemes": ["http", "https"],
        }
    if slot == 18:
        host = f"llm{i}.{org}.ai"
        spec.credential_hosts.append(host)
        return {
            "id": f"{rid}-llm",
            "action": "allow",
            "hosts": [host],
            "methods": ["POST"],
            "paths": ["/v1/messages", "/v1/messages/count_tokens"],
            "headers": {"content-type": "application/json*"},
            "credential": f"cred-{block % _CREDENTIALS}",
        }
    if block % 2 == 0:
        k = block // 2
        prefix = f"10.{(k >> 8) & 255}.{k & 255}."
        spec.cidr_prefixes.append(prefix)
        return {"id": f"{rid}-cidr", "action": "allow", "cidrs": [f"{prefix}0/24"], "ports": [8443]}
    return {"id": f"{rid}-report", "action": "deny", "mode": "report", "hosts": [api_host], "paths": ["/orgs/**"]}


def generate(
    n_rules: int, *, extra_rules: Sequence[dict[str, Any]] = (), seed: int = 1
) -> tuple[dict[str, Any], PolicySpec]:
    """A policy document of exactly `n_rules` rules: generated ones plus `extra_rules` (in a policy of their own)."""
    n_generated = n_rules - len(extra_rules)
    if n_generated < 0:
        raise ValueError("more extra rules than rules")
    rng = random.Random(seed)
    spec = PolicySpec(n_rules)
    rules = [_rule(i, i // 20, _SLOT_ORDER[i % 20], rng, spec) for i in range(n_generated)]
    policies: dict[str, Any] = {}
    for start in range(0, len(rules), _POLICY_SIZE):
        policies[f"team-{start // _POLICY_SIZE:04d}"] = {"rules": rules[start : start + _POLICY_SIZE]}
    if extra_rules:
        policies["bench-upstream"] = {"description": "the benchmark's own upstream", "rules": list(extra_rules)}
    spec.policies = list(policies)
    used = sorted({r["credential"] for r in rules if "credential" in r})
    credentials = {
        name: {
            "secret": f"bench/{name}",
            "injector": {"kind": "header", "header": "Authorization", "format": "Bearer {secret}"},
        }
        for name in used
    }
    names = list(policies)
    doc: dict[str, Any] = {"version": 1}
    if credentials:
        doc["credentials"] = credentials
    doc["policies"] = policies
    doc["sandboxes"] = [
        {"id": "bench", "labels": {"env": "bench"}, "sources": ["127.0.0.1/32"], "policies": names},
        {"id": "fleet-a", "sources": ["10.200.0.0/16"], "policies": names[::2]},
        {"id": "fleet-b", "sources": ["10.201.0.0/16"], "policies": names[1::2] or names},
    ]
    return doc, spec


def write(path: Path, doc: dict[str, Any]) -> None:
    n = sum(len(p["rules"]) for p in doc["policies"].values())
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=200)
    path.write_text(f"# generated by bench/_policygen.py: {n} rules\n{text}")


# -- queries ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    category: str
    method: str  # the request-phase method (the connection phase asks the same URL without one)
    url: str
    headers: tuple[tuple[str, str], ...]
    expect_request: str  # expected request-phase verdict: "allow" or "deny"


# (category, weight): hits and misses, requests that pass and requests that are refused.
CATEGORIES: tuple[tuple[str, float], ...] = (
    ("exact-hit", 0.30),
    ("wildcard-hit", 0.15),
    ("conditioned-allow", 0.10),
    ("conditioned-nomatch", 0.05),
    ("deny-rule", 0.05),
    ("credential-hit", 0.05),
    ("miss", 0.25),
    ("ip-literal", 0.05),
)
_UA = (("user-agent", "python-httpx/0.28.1"), ("accept", "*/*"), ("accept-encoding", "gzip, deflate"))


def queries(spec: PolicySpec, count: int, seed: int = 2) -> list[Query]:
    """`count` queries in the CATEGORIES mix, shuffled; each names its expected request-phase verdict."""
    rng = random.Random(seed)
    out: list[Query] = []
    for category, weight in CATEGORIES:
        for _ in range(round(count * weight)):
            out.append(_query(category, spec, rng))
    rng.shuffle(out)
    return out


def _query(category: str, spec: PolicySpec, rng: random.Random) -> Query:
    word = rng.choice(_WORDS)
    if category == "exact-hit":
        host = rng.choice(spec.exact_hosts)
        return Query(category, "GET", f"https://{host}/simple/{word}/", _UA, "allow")
    if category == "wildcard-hit":
        labels = ".".join(f"{rng.choice(_SERVICES)}{rng.randint(0, 99)}" for _ in range(rng.randint(1, 3)))
        host = f"{labels}.{rng.choice(spec.wildcard_suffixes)}"
        return Query(category, "GET", f"https://{host}/assets/app.js", _UA, "allow")
    if category == "conditioned-allow":
        if rng.random() < 0.5:
            return Query(category, "GET", f"https://{rng.choice(spec.api_hosts)}/v1/repos/{word}?page=2", _UA, "allow")
        host = rng.choice(spec.git_hosts)
        return Query(category, "GET", f"https://{host}/{word}/tool.git/info/refs?service=git-upload-pack", _UA, "allow")
    if category == "conditioned-nomatch":
        return Query(category, "PUT", f"https://{rng.choice(spec.api_hosts)}/v2/{word}", _UA, "deny")
    if category == "deny-rule":
        if rng.random() < 0.5:
            return Query(category, "DELETE", f"https://{rng.choice(spec.api_hosts)}/v1/repos/{word}", _UA, "deny")
        return Query(category, "GET", f"https://{rng.choice(spec.deny_hosts)}/raw/{word}", _UA, "deny")
    if category == "credential-hit":
        headers = (*_UA, ("content-type", "application/json"))
        return Query(category, "POST", f"https://{rng.choice(spec.credential_hosts)}/v1/messages", headers, "allow")
    if category == "miss":
        depth = rng.randint(1, 3)
        labels = ".".join(f"{rng.choice(_SERVICES)}{rng.randint(0, 999)}" for _ in range(depth))
        return Query(category, "GET", f"https://{labels}.{word}-{rng.randint(0, 99999)}.unknown.org/x", _UA, "deny")
    if category == "ip-literal":
        if rng.random() < 0.5:
            address = f"{rng.choice(spec.cidr_prefixes)}{rng.randint(1, 254)}"
            return Query(category, "GET", f"https://{address}:8443/v1/", _UA, "allow")
        return Query(category, "GET", f"https://192.0.2.{rng.randint(1, 254)}/", _UA, "deny")
    raise ValueError(category)


# Destinations seen for the first time: what a decision costs before any cache knows the answer. Sandboxes make
# such names at will (random subdomains under an allowed wildcard, random names, random addresses).
COLD_CATEGORIES: tuple[tuple[str, float], ...] = (("wildcard-new", 0.45), ("miss-new", 0.45), ("ip-literal-new", 0.10))


def cold_queries(spec: PolicySpec, count: int, tag: str, seed: int = 3) -> list[Query]:
    """`count` queries whose destinations are all distinct (and distinct from other tags' and `queries`')."""
    rng = random.Random(seed)
    out: list[Query] = []
    k = 0
    for category, weight in COLD_CATEGORIES:
        for _ in range(round(count * weight)):
            k += 1
            if category == "wildcard-new":
                host = f"n{tag}{k}.{rng.choice(_SERVICES)}.{rng.choice(spec.wildcard_suffixes)}"
                out.append(Query(category, "GET", f"https://{host}/assets/app.js", _UA, "allow"))
            elif category == "miss-new":
                host = f"n{tag}{k}.{rng.choice(_SERVICES)}.{rng.choice(_WORDS)}-{k}.unknown.org"
                out.append(Query(category, "GET", f"https://{host}/x", _UA, "deny"))
            else:
                # Addresses no CIDR rule covers (198.18.0.0/15, a different /16 per tag), on a CIDR rule's port:
                # the whole list of CIDR rules is looked at, as for any address not seen before.
                second = 18 + sum(map(ord, tag)) % 2
                address = f"198.{second}.{(k >> 8) & 255}.{k & 255}"
                out.append(Query(category, "GET", f"https://{address}:8443/v1/", _UA, "deny"))
    rng.shuffle(out)
    return out
