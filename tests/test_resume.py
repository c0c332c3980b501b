"""Exact resume: a run killed after a checkpoint and resumed matches an uninterrupted run."""

import pytest
import torch

from helpers import make_trainer, merge
from utils.errors import CheckpointError
from utils.schema import ConfigError

SECTIONS = dict(
    datasets={"train": {"batch_size": 6, "num_items": 50}},  # shuffled, 8 batches per epoch
    networks={"mlp": {"kwargs": {"dropout": 0.2}}},
    steps={
        "fit": {
            "injectors": {
                "_replace": True,
                "noise": {"type": "add_noise", "std": 0.1, "in": "x", "out": "xn"},
                "pred": {"type": "generator", "generator": "mlp", "in": "xn", "out": "pred"},
            },
            "clip_grad_eps": 0.5,
        }
    },
    train={
        "niter": 20,
        "mega_batch_factor": 2,
        "default_lr_scheme": "CosineAnnealing",
        "warmup_iter": 4,
        "ema_rate": 0.9,
    },
    logger={"save_checkpoint_freq": 5},
)


class Killed(Exception):
    pass


def record(trainer, losses, kill_at=None):
    def callback(step, logs):
        losses[step] = logs["loss/mse"].item()
        if step == kill_at:
            raise Killed

    trainer.step_callbacks.append(callback)


def test_resume_matches_uninterrupted_run(tmp_path):
    straight: dict[int, float] = {}
    t = make_trainer(tmp_path / "straight", **SECTIONS)
    record(t, straight)
    t.train()

    first: dict[int, float] = {}
    t = make_trainer(tmp_path / "resumed", **SECTIONS)
    record(t, first, kill_at=12)  # dies at step 12: the newest checkpoint is step 10
    with pytest.raises(Killed):
        t.train()
    resumed: dict[int, float] = {}
    t2 = make_trainer(tmp_path / "resumed", **SECTIONS, path={"resume_state": "auto"})
    assert t2.step == 10
    record(t2, resumed)
    t2.train()

    assert sorted(straight) == list(range(1, 21))
    assert sorted(resumed) == list(range(11, 21))
    for step in range(1, 13):
        assert first[step] == straight[step], step
    for step in range(11, 21):
        assert resumed[step] == straight[step], step
    a = torch.load(tmp_path / "straight" / "toy" / "training_state" / "20.state", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "toy" / "training_state" / "20.state", weights_only=True)
    assert a["loader"] == b["loader"] and a["rng"][0]["torch"].equal(b["rng"][0]["torch"])


def test_explicit_resume_state_and_missing_file(tmp_path):
    make_trainer(tmp_path, train={"niter": 4}, logger={"save_checkpoint_freq": 2}).train()
    state = tmp_path / "toy" / "training_state" / "2.state"
    t = make_trainer(tmp_path, train={"niter": 4}, path={"resume_state": str(state)})
    assert t.step == 2
    with pytest.raises(CheckpointError, match="9.state"):
        make_trainer(tmp_path, path={"resume_state": str(state.with_name("9.state"))})


# ----------------------------------------------------------------------------- changed options
RUN = dict(
    train={"niter": 6, "default_lr_scheme": "MultiStepLR", "gen_lr_steps": [4], "lr_gamma": 0.5},
    logger={"save_checkpoint_freq": 2},
)


FIRST_TWO = merge(RUN, {"train": {"niter": 2}})


def resumed_with(tmp_path, **changes):
    return make_trainer(tmp_path, **merge(RUN, {**changes, "path": {"resume_state": "auto"}}))


def test_resume_applies_changed_hyperparameters_and_logs_them(tmp_path, caplog):
    make_trainer(tmp_path, **FIRST_TWO).train()
    optimizer_params = {"lr": 4e-3, "weight_decay": 0.05, "beta1": 0.8}
    schedule = {"gen_lr_steps": [1], "lr_gamma": 0.25}
    with caplog.at_level("INFO"):
        trainer = resumed_with(
            tmp_path, steps={"fit": {"optimizer_params": optimizer_params}}, train=schedule
        )
    assert trainer.step == 2
    decayed, plain = trainer.steps["fit"].optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.999)
    # the new schedule at the resumed position: 4e-3 * 0.25 (step 2 is past the milestone 1)
    assert decayed["lr"] == plain["lr"] == pytest.approx(1e-3)
    assert trainer.schedulers["fit"].base_lrs == [4e-3, 4e-3]
    log = caplog.text
    for line in (
        "steps.fit.optimizer_params.lr: 0.01 -> 0.004",
        "steps.fit.optimizer_params.weight_decay: (unset) -> 0.05",
        "train.gen_lr_steps: [4] -> [1]",
        "train.lr_gamma: 0.5 -> 0.25",
        "steps.fit weight_decay: 0.01 -> 0.05",
        "steps.fit betas: (0.9, 0.999) -> (0.8, 0.999)",
        "steps.fit lr: [0.01, 0.01] -> [0.004, 0.004]",
    ):
        assert line in log, line
    assert "path.resume_state" not in log  # resuming is not a change
    trainer.train()  # and training goes on with them
    assert trainer.steps["fit"].optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_resume_unchanged_logs_no_changes(tmp_path, caplog):
    make_trainer(tmp_path, **FIRST_TWO).train()
    with caplog.at_level("INFO"):
        trainer = make_trainer(
            tmp_path,
            **{**RUN, "train": {**RUN["train"], "niter": 2}},
            path={"resume_state": "auto"},
        )
    assert trainer.step == 2
    assert "changed since" not in caplog.text and "in effect from" not in caplog.text


def test_resume_refuses_another_optimizer_kind(tmp_path):
    make_trainer(tmp_path, **FIRST_TWO).train()
    with pytest.raises(ConfigError) as e:
        resumed_with(tmp_path, steps={"fit": {"optimizer": "sgd"}})
    msg = dict(e.value.problems)["steps.fit.optimizer"]
    assert "is 'sgd'" in msg and "trained with 'adamw'" in msg
    assert "path.pretrain_model_mlp:" in msg and "2_mlp.safetensors" in msg
