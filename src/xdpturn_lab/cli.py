"""`xdpturn-lab`: the demo and the benchmarks, tooling beside the relay (both need root)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xdpturn.cli.args import run_command


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the fast path, the Python path and coturn side by side",
        description="Build a testbed and run the same throughput, latency and control-plane "
        "workloads against each relay; print a table with ratios to coturn and write a JSON "
        "file and a PNG chart. Needs root. See docs/performance.md.",
    )
    from xdpturn_lab.bench.suite import add_arguments

    add_arguments(p)
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from xdpturn_lab.bench.suite.run import main

    return main(args)


def _add_flood(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "flood",
        help="a legitimate client's loss and round trip while junk floods the relay",
        description="Build a testbed; for each relay, ping through a channel at 500/s, quiet "
        "and while one process floods the TURN port with junk; print loss, round trips, the "
        "junk rate and the relay's memory. Needs root. See docs/security.md.",
    )
    from xdpturn_lab.bench.flood import add_arguments

    add_arguments(p)
    p.set_defaults(run=_flood)


def _flood(args: argparse.Namespace) -> int:
    from xdpturn_lab.bench.flood import main

    return main(args)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="watch the relay and its fast path at work in a throw-away testbed",
        description="Build a testbed (a Client and a Gateway behind NATs, one relay), relay "
        "traffic between them through the fast path in both families, show live rates, print "
        "which routes carried how much, and tear it all down. Needs root. See docs/demo.md.",
    )
    from xdpturn_lab.demo import add_arguments

    add_arguments(p)
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from xdpturn_lab.demo import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpturn-lab", description="The xdpturn demo and benchmarks (testbed in namespaces)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bench(sub)
    _add_flood(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
