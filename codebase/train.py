"""Train an experiment: ``python train.py -opt ../experiments/x.yml [-o key.sub=value ...]``.

Runs from ``codebase/`` or as ``python codebase/train.py`` from the repository root.
``--dry-run`` validates the whole experiment (every key, name and type) and exits.

Exit codes: 0 done, 1 a bug (traceback), 2 a bad option or file, 3 the run diverged, 4 bad
data, 5 a bad checkpoint, 6 the system refused (disk full, no permission), 130 Ctrl-C.
``--debug`` prints the traceback of any error.
"""

from __future__ import annotations

import argparse
import sys

# Python puts this file's folder (codebase/) first on sys.path, so `python codebase/train.py`
# from the repository root imports the same packages as `python train.py` from codebase/.
from trainer.config import load_experiment_cli
from trainer.extensible_trainer import ExtensibleTrainer
from trainer.run_summary import run_summary
from utils.errors import run_command
from utils.options import experiment_parser


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
    """Train (or validate, or evaluate) one experiment. Errors are raised, and printed by the
    boundary :func:`utils.errors.run_command` with their exit code."""
    args = parse_args(argv)
    exp = load_experiment_cli(args)
    if args.dry_run:
        print(
            f"{exp.file}: OK ({len(exp.networks)} network(s), {len(exp.steps)} "
            f"step(s), run folder {exp.run_dir})"
        )
        for step in exp.steps.values():  # what freeze / param_groups leave to train
            if step.trainable_summary:
                print(f"  {step.trainable_summary}")
        return 0

    trainer = ExtensibleTrainer(exp)
    if args.evaluate:
        trainer.evaluate()
    else:
        trainer.train()  # a diverged run raises NonFiniteStreak: exit 3, for schedulers
    if trainer.dist.is_main:
        print("\n" + run_summary(trainer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
