"""Benchmarks of cube-egress: `python -m bench {policy,gateway,splice,all}` (see bench/README.md)."""
