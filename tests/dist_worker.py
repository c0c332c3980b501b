"""Runs ``train.main`` once per argument list in a JSON file, in one process of a launched job.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py RUNS.json

An entry ``{"argv": [...], "kill_at": N}`` instead trains until step N and then dies as a
killed job would (every rank at the same step), leaving only the checkpoints saved so far.
Several runs share one launch (and one process group) because starting processes is most of
the cost of a distributed test. Used by tests/test_ddp.py and tests/test_deepspeed.py through
``helpers.launch``, which sets PYTHONPATH so that ``codebase/`` is importable; helpers.py also
has the readers of what the runs wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Killed(Exception):
    pass


def train_until_killed(argv: list[str], kill_at: int) -> None:
    from trainer.config import validate_experiment
    from trainer.extensible_trainer import ExtensibleTrainer
    from utils.options import load_options

    args = train.parse_args(argv)
    trainer = ExtensibleTrainer(validate_experiment(load_options(args.opt, args.override)))

    def kill(step: int, logs: dict) -> None:
        if step == kill_at:
            raise Killed

    trainer.step_callbacks.append(kill)
    try:
        trainer.train()
    except Killed:
        return
    raise AssertionError(f"the run ended before step {kill_at}")


def main() -> int:
    import torch.distributed as dist

    from utils.errors import run_command

    for run in json.loads(Path(sys.argv[1]).read_text()):
        if isinstance(run, dict):
            train_until_killed(run["argv"], run["kill_at"])
        elif rc := run_command(train.main, run):
            return rc
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import train  # codebase/ is on PYTHONPATH (see helpers.launch)

    sys.exit(main())
