"""Shared fixtures: a small toy experiment built in code (components from experiments/plugins)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY_PLUGIN = str(REPO / "experiments" / "plugins" / "toy.py")


def toy_options(**sections: Any) -> dict:
    """A complete, valid toy experiment; keyword arguments replace or deep-merge sections."""
    opt = {
        "name": "toy",
        "seed": 7,
        "device": "cpu",
        "plugins": [TOY_PLUGIN],
        "datasets": {"train": {"mode": "toy_regression", "batch_size": 8, "num_items": 64}},
        "networks": {"mlp": {"type": "generator", "which_model_G": "toy_mlp",
                             "kwargs": {"hidden": 32}}},
        "steps": {"fit": {
            "training": "mlp",
            "optimizer": "adamw",
            "optimizer_params": {"lr": 1e-2},
            "injectors": {"pred": {"type": "generator", "generator": "mlp", "in": "x",
                                   "out": "pred"}},
            "losses": {"mse": {"type": "mse", "weight": 1.0, "fake": "pred", "real": "y"}},
        }},
        "train": {"niter": 5},
        "logger": {"print_freq": 1, "progress_bar": False, "stdin_commands": False},
    }
    return merge(opt, sections)


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_replace"):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = {kk: copy.deepcopy(vv) for kk, vv in v.items() if kk != "_replace"}
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_experiment(tmp_path: Path, **sections: Any):
    from trainer.config import validate_experiment
    from utils.options import options_from_dict

    return validate_experiment(options_from_dict(toy_options(**sections), tmp_path))


def make_trainer(tmp_path: Path, **sections: Any):
    from trainer.extensible_trainer import ExtensibleTrainer

    return ExtensibleTrainer(make_experiment(tmp_path, **sections))


@pytest.fixture
def toy_experiment(tmp_path):
    return lambda **sections: make_experiment(tmp_path, **sections)


def build_from_yaml(registry, options: dict, provided: dict | None = None,
                    base_dir: Path | None = None, path: str = "steps.s.x"):
    """Validate YAML-style component options as the trainer does, then build the component."""
    import torch

    from trainer.component import TrainerEnv, build_component
    from trainer.config import INJECTOR_SHARED, LOSS_SHARED, validate_component
    from utils.schema import Problems

    problems = Problems()
    shared = tuple(dict.fromkeys(INJECTOR_SHARED + LOSS_SHARED))
    spec = validate_component(registry, options, path, "x", problems, base_dir or Path("."),
                               shared)
    assert not problems, problems.items
    provided = dict(provided or {})
    provided.setdefault("env", TrainerEnv(device=torch.device("cpu"), run_dir=base_dir or Path(".")))
    return build_component(spec, provided)
