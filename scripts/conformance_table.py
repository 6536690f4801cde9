"""Print the strategy conformance table: every registered strategy, and the combinations the README
promises, on every architecture of the test zoo (tests/zoo.py), checked as tests/test_strategy_registry.py
checks them. Exits 1 when any cell fails.

    python scripts/conformance_table.py                       # everything (a few minutes on 2 CPU cores)
    python scripts/conformance_table.py --archs llama gpt2 --strategies selective_checkpoint --no-pairs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The zoo, the expected refusals and the bounds are test data: they live with the tests, which own them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

from conformance import PAIRS, check  # noqa: E402
from lowmem_train import available_strategies  # noqa: E402
from zoo import ZOO  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--strategies", nargs="+", default=available_strategies(),
                        help="strategies (alone, and the promised pairs made of them only)")
    parser.add_argument("--no-pairs", action="store_true", help="single strategies only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [(name,) for name in args.strategies]
    if not args.no_pairs:
        rows += [pair for pair in PAIRS if set(pair) <= set(args.strategies)]
    print("| strategy | " + " | ".join(args.archs) + " |")
    print("|---" * (len(args.archs) + 1) + "|")
    failures = 0
    start = time.perf_counter()
    for names in rows:
        cells = []
        for arch in args.archs:
            outcome = check(names, ZOO[arch])
            failures += outcome.status == "FAIL"
            cells.append(outcome.cell())
        print(f"| {' + '.join(names)} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{failures} failure(s) in {len(rows) * len(args.archs)} cells, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
