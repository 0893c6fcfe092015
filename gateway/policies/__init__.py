"""The policy language and its pure decision core.

    load_policy(paths) -> CompiledPolicy          # raises PolicyError (every issue, file:line:col)
    CompiledPolicy.identify_by_source / identify_by_token -> Identity | None
    CompiledPolicy.decide(identity, RequestFacts) -> Decision
    CompiledPolicy.check_addresses(identity, facts, addresses) -> AddressCheck
    CompiledPolicy.decide_dns(identity, qname, qtype) -> DnsDecision           # a sandbox's DNS query
    CompiledPolicy.check_dns_answers(identity, dns_decision, addresses) -> AddressCheck
    CompiledPolicy.limits_for(sandbox_id, credential) -> (UsageLimit, ...)     # counted by gateway/limits.py
    CompiledPolicy.correlation.extract(headers) -> {header: value}            # agent correlation ids
    add_sandboxes(policy, [(SandboxDTO, Position)]) -> CompiledPolicy  # run-time registrations; PolicyError

Nothing in this package performs I/O beyond reading policy files, and nothing imports mitmproxy.
"""

from __future__ import annotations

from ._addresses import AddressClass, IPAddress, classify_address
from ._decide import AddressCheck, CompiledPolicy, Decision, DnsDecision, DnsReply, Identity, Reason, RequestFacts
from ._dns import encoded_data, parse_query_name
from ._facts import facts_from_url
from ._hosts import HostError, HostPattern, normalize_host, parse_ip_literal
from ._load import HTTP_METHODS, PolicyError, PolicyIssue, SandboxConflict, add_sandboxes, load_policy
from ._model import (
    CORRELATION_INVALID,
    CorrelationSpec,
    CredentialRef,
    LimitScope,
    LimitSubject,
    Mode,
    Rule,
    Sandbox,
    Scheme,
    SecretRef,
    UsageLimit,
    Verdict,
)
from ._schema import SandboxDTO

__all__ = [
    "CORRELATION_INVALID",
    "HTTP_METHODS",
    "AddressCheck",
    "AddressClass",
    "CompiledPolicy",
    "CorrelationSpec",
    "CredentialRef",
    "Decision",
    "DnsDecision",
    "DnsReply",
    "HostError",
    "HostPattern",
    "IPAddress",
    "Identity",
    "LimitScope",
    "LimitSubject",
    "Mode",
    "PolicyError",
    "PolicyIssue",
    "Reason",
    "RequestFacts",
    "Rule",
    "Sandbox",
    "SandboxConflict",
    "SandboxDTO",
    "Scheme",
    "SecretRef",
    "UsageLimit",
    "Verdict",
    "add_sandboxes",
    "classify_address",
    "encoded_data",
    "facts_from_url",
    "load_policy",
    "normalize_host",
    "parse_ip_literal",
    "parse_query_name",
]
