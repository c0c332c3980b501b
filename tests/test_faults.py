"""A run that goes bad stops before it destroys anything; interrupted saves leave no litter;
damaged checkpoints are found before they are trained on."""

import errno
import logging
import signal
import subprocess
import sys

import pytest
import torch

import train
from helpers import REPO, make_experiment, make_trainer, weights, write_yaml
from trainer.checkpoint import CheckpointManager
from trainer.component import TrainerEnv
from trainer.extensible_trainer import NonFiniteStreak
from trainer.injectors import Injector
from utils.errors import CheckpointError, run_command
from utils.schema import ConfigError, Runtime


class NanFromStepInjector(Injector):
    """Test helper: multiplies its input by NaN on steps first, first + period, ..."""

    def __init__(self, first: int, env: Runtime[TrainerEnv], period: int = 1) -> None:
        super().__init__()
        self.first, self.period, self.env = first, period, env

    def forward(self, state):
        x, s = state[self.input], self.env.step
        bad = s >= self.first and (s - self.first) % self.period == 0
        return {self.output: x * float("nan") if bad else x}


def run_sections(first: int, every: int = 1, **train) -> dict:
    """8 steps, input NaN from step ``first`` on every ``every`` steps; save every 2, keep 1."""
    poison = {"type": "nan_from_step", "first": first, "period": every, "in": "x", "out": "xp"}
    pred = {"type": "generator", "generator": "mlp", "in": "xp", "out": "pred"}
    return dict(
        steps={"fit": {"injectors": {"_replace": True, "poison": poison, "pred": pred}}},
        train={"niter": 8, "max_nonfinite_streak": 3, **train},
        logger={"save_checkpoint_freq": 2, "keep_last": 1},
    )


def test_streak_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, **run_sections(first=4))
    with pytest.raises(NonFiniteStreak) as e:
        trainer.train()
    msg = str(e.value)
    assert trainer.step == 6  # steps 4, 5, 6 skipped: the third stops it
    assert "3 steps in a row" in msg and "began at step 4" in msg
    assert "training_state/2.state" in msg and "path.resume_state=" in msg
    states = tmp_path / "toy" / "training_state"
    # 4 was saved inside the streak (shorter than the limit then); with keep_last 1 it would
    # have pruned 2 (see the control below), but 2 is the last good one and stays.
    assert sorted(p.name for p in states.iterdir()) == ["2.state", "4.state"]
    assert (tmp_path / "toy" / "models" / "2_mlp.safetensors").is_file()
    assert not (states / "6.state").exists()  # the bad weights are not saved


def test_without_streak_keep_last_prunes_step_2(tmp_path):
    """Control for the test above: the same run without NaN keeps only the newest."""
    make_trainer(tmp_path, **run_sections(first=100, niter=4)).train()
    states = tmp_path / "toy" / "training_state"
    assert sorted(p.name for p in states.iterdir()) == ["4.state"]


def test_isolated_nonfinite_steps_do_not_stop(tmp_path):
    trainer = make_trainer(tmp_path, **run_sections(first=2, every=2, max_nonfinite_streak=2))
    trainer.train()  # steps 2, 4, 6, 8 skipped, never two in a row
    assert trainer.step == 8 and trainer.counters.skipped_steps == 4
    assert not trainer.checkpoints.protected  # a clean step ends each streak


def test_streak_option_disabled(tmp_path):
    trainer = make_trainer(tmp_path, **run_sections(first=3, max_nonfinite_streak=None))
    trainer.train()
    assert trainer.step == 8 and trainer.counters.skipped_steps == 6


def test_max_nonfinite_streak_validated(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, train={"max_nonfinite_streak": 0})
    assert "must be >= 1" in dict(e.value.problems)["train.max_nonfinite_streak"]


def test_train_cli_exits_3(tmp_path, capsys):
    path = write_yaml(tmp_path, base={}, **run_sections(first=2))
    assert run_command(train.main, ["-opt", path]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: stopping: 3 steps in a row") and "began at step 2" in err
    assert "no checkpoint was saved before it" in err


def test_protected_step_survives_pruning(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.protect(1)
    for step in (1, 2, 3):
        manager.state_path(step).parent.mkdir(parents=True, exist_ok=True)
        manager.state_path(step).write_bytes(b"x")
        manager._prune(just_saved=step)
    assert manager.steps() == [1, 3]
    manager.unprotect(1)
    manager._prune(just_saved=3)
    assert manager.steps() == [3]


def test_leftover_temporary_files_removed_at_start(tmp_path):
    make_trainer(tmp_path, train={"niter": 2}).train()
    run = tmp_path / "toy"
    real = sorted(p.name for p in [*run.glob("models/*"), *run.glob("training_state/*")])
    leftovers = [
        run / "models" / ".2_mlp.safetensors.tmp-1234",
        run / "training_state" / ".2.state.tmp-99",
    ]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    unrelated = run / "models" / "notes.tmp-1"  # not atomic_write's name: left alone
    unrelated.write_text("mine")
    trainer = make_trainer(tmp_path, train={"niter": 2})
    assert not any(p.exists() for p in leftovers) and unrelated.exists()
    unrelated.unlink()
    assert real == sorted(p.name for p in [*run.glob("models/*"), *run.glob("training_state/*")])
    assert trainer.checkpoints.remove_leftovers() == (0, 0)


# ----------------------------------------------------------------------------- damaged files
def flip_bit(path, offset=-1, mask=0x40):
    """One flipped bit, by default an exponent bit of the file's last float."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


SAVES = {"train": {"niter": 4}, "logger": {"save_checkpoint_freq": 2}}


def test_resume_auto_skips_checkpoint_with_a_flipped_weight_bit(tmp_path, caplog):
    make_trainer(tmp_path, **SAVES).train()
    models = tmp_path / "toy" / "models"
    flip_bit(models / "4_mlp.safetensors")
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tmp_path, **SAVES, path={"resume_state": "auto"})
    assert trainer.step == 2  # not the damaged step 4
    assert "4_mlp.safetensors is corrupt" in caplog.text
    saved = weights(tmp_path, 2)
    assert all(
        torch.equal(p, saved[k]) for k, p in trainer.raw_networks["mlp"].state_dict().items()
    )


def test_resume_auto_refuses_when_no_checkpoint_is_intact(tmp_path):
    make_trainer(tmp_path, **SAVES).train()
    run = tmp_path / "toy"
    flip_bit(run / "models" / "2_mlp.safetensors")
    (run / "training_state" / "4.state").write_bytes(b"garbage")
    before = {
        p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tb_logger" not in str(p)
    }
    with pytest.raises(CheckpointError) as e:
        make_trainer(tmp_path, **SAVES, path={"resume_state": "auto"})
    msg = str(e.value)
    assert "none of the 2 checkpoint(s)" in msg and "2_mlp.safetensors is corrupt" in msg
    assert "4.state" in msg and "path.resume_state: null" in msg
    after = {p: p.read_bytes() for p in before}
    assert after == before  # nothing of the old run was touched


def test_train_cli_exits_5_naming_the_damaged_files(tmp_path, capsys):
    make_trainer(tmp_path, **SAVES).train()
    for step in (2, 4):
        flip_bit(tmp_path / "toy" / "models" / f"{step}_mlp.safetensors")
    path = write_yaml(tmp_path, base={}, **SAVES, path={"resume_state": "auto"})
    assert run_command(train.main, ["-opt", path]) == 5
    err = capsys.readouterr().err
    assert err.startswith("error: resume_state is 'auto' but none of the 2 checkpoint(s)")
    assert "2_mlp.safetensors is corrupt" in err and "4_mlp.safetensors is corrupt" in err
    assert "Traceback" not in err


def test_corrupt_pretrained_file_is_refused(tmp_path):
    make_trainer(tmp_path / "a", train={"niter": 2}, logger={"save_checkpoint_freq": 2}).train()
    pretrained = tmp_path / "a" / "toy" / "models" / "2_mlp.safetensors"
    flip_bit(pretrained)
    with pytest.raises(CheckpointError, match="2_mlp.safetensors is corrupt"):
        make_trainer(tmp_path / "b", path={"pretrain_model_mlp": str(pretrained)})


KILL_DURING_SAVE = """
import os, signal, sys
sys.path[:0] = {paths!r}
import utils.io
from helpers import make_trainer

real_replace, calls = os.replace, []

def replace_then_die(src, dst):
    # The second checkpoint (step 4): its network file is written and synced, not yet renamed
    if str(dst).endswith("4_mlp.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

utils.io.os.replace = replace_then_die
make_trainer({tmp!r}, train={{"niter": 6}}, logger={{"save_checkpoint_freq": 2}}).train()
"""


@pytest.mark.slow
def test_kill_during_save_then_resume_is_exact(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: the resumed run removes the litter,
    continues from the last complete checkpoint and ends bit-identical to an unbroken run."""
    code = KILL_DURING_SAVE.format(
        paths=[str(REPO / "codebase"), str(REPO / "tests")], tmp=str(tmp_path / "killed")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    run = tmp_path / "killed" / "toy"
    assert any(p.name.startswith(".4_mlp") for p in (run / "models").iterdir())  # the litter
    assert sorted(p.name for p in (run / "training_state").glob("*.state")) == ["2.state"]

    sections = {"train": {"niter": 6}, "logger": {"save_checkpoint_freq": 2}}
    resumed = make_trainer(tmp_path / "killed", **sections, path={"resume_state": "auto"})
    assert resumed.step == 2
    assert not any(p.name.startswith(".") for p in (run / "models").iterdir())
    resumed.train()
    make_trainer(tmp_path / "straight", **sections).train()
    a, b = weights(tmp_path / "killed", 6), weights(tmp_path / "straight", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB file system of its own (tmpfs), where the platform lets tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder):
    """Write a file into ``folder`` until its file system is full; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_during_save_loses_nothing(small_disk):
    sections = {"train": {"niter": 4}, "logger": {"save_checkpoint_freq": 2}}
    make_trainer(small_disk, **{**sections, "train": {"niter": 2}}).train()
    trainer = make_trainer(small_disk, **sections, path={"resume_state": "auto"})
    filler = fill(small_disk)
    with pytest.raises(OSError) as e:
        trainer.train()
    assert e.value.errno == errno.ENOSPC
    run = small_disk / "toy"
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]  # no half-written litter
    assert trainer.checkpoints.resolve_resume("auto") == trainer.checkpoints.state_path(2)
    filler.unlink()
    resumed = make_trainer(small_disk, **sections, path={"resume_state": "auto"})
    assert resumed.step == 2
    resumed.train()
    assert resumed.checkpoints.steps()[-1] == 4
