"""Long robustness runs, and re-validation of a recorded run.

    python -m tests.robustness --duration 3600 --profile watch-heavy --target proxy --seed 7
    python -m tests.robustness --check /tmp/robustness/soak-proxy-seed7.jsonl

A run records RSS and open fds of every proxy process every --sample-every seconds and fails if
they grow (first vs last quarter of the run); it exits 1 on any violation, 0 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from tests.robustness.harness import PROFILES, TARGETS, RunConfig, run
from tests.robustness.history import History, load
from tests.robustness.inject import FAULTS, LINK_FAULTS, MEMBER_FAULTS, PROXY_FAULTS
from tests.robustness.validators import check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.robustness", description=__doc__.split("\n")[0])
    p.add_argument("--check", type=Path, help="re-run the validators on a recorded history (JSON lines) and exit")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--profile", choices=sorted(PROFILES), default="mixed")
    p.add_argument("--target", choices=TARGETS, default="proxy")
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument(
        "--faults",
        default="default",
        help=f"comma-separated, 'none', or 'default' (proxy: {','.join(PROXY_FAULTS + LINK_FAULTS)}; "
        f"with --cluster also {','.join(MEMBER_FAULTS)}); known: {','.join(FAULTS)}",
    )
    p.add_argument("--cluster", action="store_true", help="a 3-member etcd cluster (member faults)")
    p.add_argument("--out", type=Path, default=Path("/tmp/etcdproxy-robustness"), help="where histories go")
    p.add_argument("--sample-every", type=float, default=10.0, help="RSS/fd sampling interval, seconds (0: off)")
    p.add_argument("--gap", type=float, default=5.0, help="seconds between faults")
    args = p.parse_args(argv)

    if args.check is not None:
        report = check(History.of(load(args.check)))
        print(report.summary())
        for v in report.violations:
            print(f"  {v}")
        return 1 if report.violations else 0

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    if args.faults == "default":
        faults = list(PROXY_FAULTS + LINK_FAULTS) if args.target == "proxy" else []
        if args.cluster:
            faults += list(MEMBER_FAULTS)
    elif args.faults == "none":
        faults = []
    else:
        faults = [f for f in args.faults.split(",") if f]
        unknown = set(faults) - set(FAULTS)
        if unknown:
            p.error(f"unknown faults {sorted(unknown)}")
    if args.target != "proxy" and set(faults) & set(PROXY_FAULTS):
        p.error(f"{sorted(set(faults) & set(PROXY_FAULTS))} need --target proxy (etcdproxy's process titles)")
    print(f"seed {seed}: target={args.target} profile={args.profile} duration={args.duration}s faults={faults}")
    started = time.monotonic()
    result = run(
        RunConfig(
            name=f"soak-{args.profile}",
            out_dir=args.out,
            seed=seed,
            target=args.target,
            profile=args.profile,
            duration=args.duration,
            faults=faults,
            cluster=args.cluster,
            gap_s=args.gap,
            sample_every=args.sample_every if args.target != "direct" else 0.0,
        )
    )
    print(result.summary())
    print(f"wall {time.monotonic() - started:.0f}s; replay with: python -m tests.robustness --check {result.path}")
    return 0 if result.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
