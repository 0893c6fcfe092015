"""The policy language and its pure decision core.

    load_policy(paths) -> CompiledPolicy          # raises PolicyError (every issue, file:line:col)
    CompiledPolicy.identify_by_source / identify_by_token -> Identity | None
    CompiledPolicy.decide(identity, RequestFacts) -> Decision
    CompiledPolicy.check_addresses(identity, facts, addresses) -> AddressCheck
    CompiledPolicy.decide_dns(identity, qname, qtype) -> DnsDecision           # a sandbox's DNS query
    CompiledPolicy.check_dns_answers(identity, dns_decision, addresses) -> AddressCheck

Nothing in this package performs I/O beyond reading policy files, and nothing imports mitmproxy.
"""

from __future__ import annotations

from ._addresses import AddressClass, IPAddress, classify_address
from ._decide import AddressCheck, CompiledPolicy, Decision, DnsDecision, DnsReply, Identity, Reason, RequestFacts
from ._dns import encoded_data, parse_query_name
from ._facts import facts_from_url
from ._hosts import HostError, HostPattern, normalize_host, parse_ip_literal
from ._load import HTTP_METHODS, PolicyError, PolicyIssue, load_policy
from ._model import CredentialRef, Mode, Rule, Sandbox, Scheme, SecretRef, Verdict

__all__ = [
    "HTTP_METHODS",
    "AddressCheck",
    "AddressClass",
    "CompiledPolicy",
    "CredentialRef",
    "Decision",
    "DnsDecision",
    "DnsReply",
    "HostError",
    "HostPattern",
    "IPAddress",
    "Identity",
    "Mode",
    "PolicyError",
    "PolicyIssue",
    "Reason",
    "RequestFacts",
    "Rule",
    "Sandbox",
    "Scheme",
    "SecretRef",
    "Verdict",
    "classify_address",
    "encoded_data",
    "facts_from_url",
    "load_policy",
    "normalize_host",
    "parse_ip_literal",
    "parse_query_name",
]
