"""A run that goes bad stops before it destroys anything; interrupted saves leave no litter."""

import pytest

import train
from helpers import make_experiment, make_trainer, write_yaml
from trainer.checkpoint import CheckpointManager
from trainer.component import TrainerEnv
from trainer.extensible_trainer import NonFiniteStreak
from trainer.injectors import Injector
from utils.errors import run_command
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
