"""Tooling beside the relay: the testbed (namespaces, veth, NAT), the demo and the benchmarks.

It imports `xdpturn`; `xdpturn` never imports it, so the relay installs and runs without it.
"""
