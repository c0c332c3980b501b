"""Runs ``train.main`` once per argument list in a JSON file, in one process of a launched job.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py RUNS.json

An entry ``{"argv": [...], "kill_at": N}`` instead trains until step N and then dies as a
killed job would (every rank at the same step), leaving only the checkpoints saved so far.
Several runs share one launch (and one process group) because starting processes is most of
the cost of a distributed test. Used by tests/test_ddp.py and tests/test_deepspeed.py through
:func:`launch`, which sets PYTHONPATH so that ``codebase/`` is importable; the helpers below
read what the runs wrote.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_yaml(folder: Path, options: dict) -> str:
    """``options`` as ``folder/exp.yml`` (the run folder becomes ``folder/<name>``)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.yml"
    path.write_text(yaml.safe_dump(options))
    return str(path)


def saved_weights(run: Path, step: int, net: str = "mlp", ema: bool = False) -> dict:
    """The tensors of ``<run>/models/<step>_<net>[_ema].safetensors``."""
    from safetensors.torch import load_file

    return load_file(run / "models" / f"{step}_{net}{'_ema' if ema else ''}.safetensors")


def logged(run: Path, tag: str) -> list[float]:
    """Every value of TensorBoard scalar ``tag`` in ``<run>/tb_logger``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb_logger"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def launch(runs: list[list[str] | dict], workdir: Path, nproc: int | None, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run each of ``runs`` (see the module doc) in ``nproc`` processes under torchrun, or in
    one plain ``python`` process (no launcher) when ``nproc`` is None."""
    spec = workdir / "runs.json"
    spec.write_text(json.dumps(runs))
    launcher = [] if nproc is None else [
        "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, __file__, str(spec)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO / "codebase"), str(REPO / "tests")]),
                **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a parent job's variables would confuse torchrun
    out = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n"
                             f"{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return out


def main() -> int:
    import torch.distributed as dist

    for run in json.loads(Path(sys.argv[1]).read_text()):
        if isinstance(run, dict):
            train_until_killed(run["argv"], run["kill_at"])
        elif rc := train.main(run):
            return rc
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import train  # codebase/ is on PYTHONPATH (see launch)

    sys.exit(main())
