"""``python -m tests.simulation --seed N`` replays a seed; ``--seeds N`` runs seeds 0..N-1 (see runner)."""

from __future__ import annotations

import argparse
import os
import sys

from tests.simulation import runner, variants


def main() -> int:
    """Run the seeds asked for; print one replay line per failing seed; exit 1 if any failed."""
    if os.environ.get("PYTHONHASHSEED") != "0":  # set iteration order is part of a replay
        os.execvpe(sys.executable, [sys.executable, "-m", "tests.simulation", *sys.argv[1:]],
                   {**os.environ, "PYTHONHASHSEED": "0"})  # fmt: skip
    parser = argparse.ArgumentParser(prog="python -m tests.simulation")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="replay one seed, printing what it broke")
    which.add_argument("--seeds", type=int, help="run seeds 0..N-1")
    parser.add_argument("--start", type=int, default=0, help="first seed of --seeds")
    parser.add_argument("--profile", choices=["full", "ci"], default="full", help="fault profile (see World)")
    parser.add_argument("--variant", choices=sorted(variants.VARIANTS), help="run a deliberately broken variant")
    parser.add_argument("--first", action="store_true", help="stop at the first failing seed (finding a variant)")
    args = parser.parse_args()
    variant = variants.VARIANTS[args.variant] if args.variant else None
    if args.seed is not None:
        outcome = runner.run(args.seed, variant, args.profile)
        print(f"seed {outcome.seed}: {outcome.summary}; {outcome.virtual:.0f} virtual seconds")
        for violation in outcome.violations:
            print(f"  {violation}")
        return 1 if outcome.violations else 0
    seeds = range(args.start, args.start + args.seeds)
    failing, seconds = runner.run_many(seeds, variant, args.profile, stop_at_first=args.first)
    for outcome in failing:
        broken = sorted({v.invariant for v in outcome.violations})
        print(f"FAIL seed {outcome.seed} ({', '.join(broken)}): {outcome.replay(args.variant)}")
    ran = failing[-1].seed - seeds.start + 1 if args.first and failing else len(seeds)
    print(f"{ran} seeds, {len(failing)} failing, {seconds:.1f}s")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
