"""Train an experiment: ``python train.py -opt ../experiments/x.yml [-o key.sub=value ...]``.

Runs from ``codebase/`` or as ``python codebase/train.py`` from the repository root.
``--dry-run`` validates the whole experiment (every key, name and type) and exits.
"""

from __future__ import annotations

import argparse
import sys

# Python puts this file's folder (codebase/) first on sys.path, so `python codebase/train.py`
# from the repository root imports the same packages as `python train.py` from codebase/.
from trainer.config import load_experiment_cli
from trainer.extensible_trainer import ExtensibleTrainer, NonFiniteStreak
from trainer.run_summary import run_summary
from utils.options import experiment_parser
from utils.schema import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = experiment_parser(__doc__)
    p.add_argument(
        "--dry-run", action="store_true", help="validate the experiment and exit without training"
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="run validation and the evaluators on the checkpoint that "
        "path.resume_state names (or the initial weights), print the report "
        "and exit without training",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exp = load_experiment_cli(args)
    if exp is None:
        return 2
    if args.dry_run:
        print(
            f"{exp.file}: OK ({len(exp.networks)} network(s), {len(exp.steps)} "
            f"step(s), run folder {exp.run_dir})"
        )
        return 0

    try:
        trainer = ExtensibleTrainer(exp)
    except ConfigError as e:  # start-up checks that need data (state keys)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.evaluate:
        trainer.evaluate()
    else:
        try:
            trainer.train()
        except NonFiniteStreak as e:  # a diverged run: its own exit code, for schedulers
            print(f"error: {e}", file=sys.stderr)
            return 3
    if trainer.dist.is_main:
        print("\n" + run_summary(trainer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
