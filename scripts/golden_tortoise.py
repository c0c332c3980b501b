"""Print every comparison of our unified_voice2 with the original Tortoise / DLAS outputs.

    python scripts/golden_tortoise.py

Fixtures: shared/golden/tortoise beside the repository, or the folder in $TORTOISE_GOLDEN.

The comparisons are the ones tests/test_unified_voice2.py asserts (tests/tortoise_golden.py);
exit status 1 if any is over the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "codebase"), str(ROOT / "tests")]

import torch

from tortoise_golden import GOLDEN, compare_all, table


def main() -> int:
    torch.set_num_threads(1)  # the fixtures were computed with one thread
    rows = compare_all()
    print(f"fixtures: {GOLDEN}\n{table(rows)}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
