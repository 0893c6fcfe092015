"""Kernel enforcement (tc and cgroup BPF programs that force sandbox traffic through the gateway).

Not built yet: this package is the enforcement issue's work. Until it lands, transparent mode relies on the
nftables redirect described in docs/architecture.md, and nothing here is imported by the gateway.
"""
