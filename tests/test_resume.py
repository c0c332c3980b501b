"""Exact resume: a run killed after a checkpoint and resumed matches an uninterrupted run."""

import pytest
import torch

from helpers import make_trainer
from utils.errors import CheckpointError

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
