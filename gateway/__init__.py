"""cube-egress gateway: decides, injects and audits every request a sandbox sends."""

__version__ = "0.1.0"
