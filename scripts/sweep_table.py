"""Print the summary table of an existing multirun directory (also written as sweep_summary.md at its end).

    python scripts/sweep_table.py multirun/2026-11-22/10-00-00
"""

import argparse

from lowmem_train.sweep import sweep_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    print(sweep_table(parser.parse_args().sweep_dir), end="")
