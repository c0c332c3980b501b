"""engine: deepspeed on CPU: the same training as the local engine, save and exact resume,
bf16, 2 ranks, and the config errors a user can trigger."""

import importlib.util
from pathlib import Path

import pytest
import torch

import helpers
from helpers import NITER, launch, logged, make_experiment, make_trainer, merge, weights
from helpers import SECTIONS as TOY_SECTIONS
from utils.schema import ConfigError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason='deepspeed is not installed (pip install -e ".[deepspeed]")'
)

SECTIONS = merge(TOY_SECTIONS, {"logger": {"keep_last": 1}})
DS = dict(engine="deepspeed", deepspeed={"zero_stage": 2})


def write_yaml(folder: Path, **sections) -> str:
    return helpers.write_yaml(folder, SECTIONS, **sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process without a launcher (DeepSpeed needs a process group: the engine makes one):
    ZeRO-2 straight, killed at step 6 and resumed, and a bf16 ZeRO-1 run with EMA; then two
    processes under torchrun. The local engine in this process is the reference."""
    root = tmp_path_factory.mktemp("deepspeed")
    straight = write_yaml(root / "straight", **DS)
    killed = write_yaml(root / "resumed", **DS)
    bf16 = write_yaml(
        root / "bf16",
        precision="bf16",
        engine="deepspeed",
        deepspeed={"zero_stage": 1},
        train={"ema_rate": 0.9},
        logger={"keep_last": None},
    )
    fp16 = write_yaml(
        root / "fp16",
        precision="fp16",
        engine="deepspeed",
        deepspeed={"zero_stage": 0},
        logger={"keep_last": None},
    )
    launch(
        [
            ["-opt", straight],
            {"argv": ["-opt", killed], "kill_at": 6},
            ["-opt", killed, "-o", "path.resume_state=auto"],
            ["-opt", bf16],
            ["-opt", fp16],
        ],
        root,
        nproc=None,
        timeout=240,
    )
    two_ranks = write_yaml(root / "two_ranks", **DS)
    launch([["-opt", two_ranks]], root, nproc=2, timeout=240)
    make_trainer(root / "local", **SECTIONS).train()
    make_trainer(root / "local_fp16", **merge(SECTIONS, {"precision": "fp16"})).train()
    return root


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_trains_the_same_steps_as_the_local_engine(runs):
    ds, local = weights(runs / "straight", NITER), weights(runs / "local", NITER)
    assert ds.keys() == local.keys()
    for k in local:
        assert ds[k].dtype == torch.float32
        torch.testing.assert_close(ds[k], local[k], rtol=1e-4, atol=1e-5, msg=k)
    val = [logged(runs / run, "val/mse") for run in ("straight", "local")]
    assert len(val[0]) == 2
    torch.testing.assert_close(torch.tensor(val[0]), torch.tensor(val[1]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_checkpoint_layout_and_pruning(runs):
    state_dir = runs / "straight" / "toy" / "training_state"
    assert sorted(p.name for p in state_dir.iterdir()) == ["8.deepspeed", "8.state"]
    assert (state_dir / "8.deepspeed" / "mlp").is_dir()  # DeepSpeed's files for network mlp
    state = torch.load(state_dir / "8.state", weights_only=True)
    assert state["engine_name"] == "deepspeed" and "optimizers" not in state


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_resume_matches_uninterrupted_run(runs):
    resumed, straight = weights(runs / "resumed", NITER), weights(runs / "straight", NITER)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_bf16_with_ema(runs):
    first, last = weights(runs / "bf16", 4), weights(runs / "bf16", NITER)
    ema = weights(runs / "bf16", NITER, ema=True)
    for k in last:  # fp32 weights that moved and stayed finite; the EMA lags behind
        assert last[k].dtype == torch.float32 and torch.isfinite(last[k]).all()
        assert ema[k].dtype == torch.float32
    assert any(not torch.equal(first[k], last[k]) for k in last)
    assert any(not torch.equal(ema[k], last[k]) for k in last)
    local = weights(runs / "local", NITER)  # bf16 compute: near the fp32 run, not equal
    for k in local:
        torch.testing.assert_close(last[k], local[k], rtol=0.05, atol=0.02, msg=k)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_fp16_zero_stage_0_matches_the_local_engine(runs):
    """fp16 autocast with a dynamic loss scale. The engines unscale in a different order, so
    they agree to ~3e-5 here; fp16 and fp32 runs differ by ~5e-2."""
    ds, local = weights(runs / "fp16", NITER), weights(runs / "local_fp16", NITER)
    for k in local:
        torch.testing.assert_close(ds[k], local[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_two_ranks_match_one_process(runs):
    two, local = weights(runs / "two_ranks", NITER), weights(runs / "local", NITER)
    for k in local:
        torch.testing.assert_close(two[k], local[k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- config errors
def config_error(tmp_path, **sections) -> str:
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, **sections)
    return str(e.value)


def test_engine_name_is_validated(tmp_path):
    msg = config_error(tmp_path, engine="deepspeeed")
    assert "engine: expected one of 'local', 'deepspeed'" in msg and "deepspeed" in msg


def test_deepspeed_section_is_validated(tmp_path):
    msg = config_error(
        tmp_path,
        engine="deepspeed",
        deepspeed={
            "zero_stage": 3,
            "zero_stag": 1,
            "config": {
                "gradient_accumulation_steps": 4,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 1},
            },
        },
    )
    assert "deepspeed.zero_stage: must be one of 0, 1, 2, got 3" in msg
    assert "deepspeed.zero_stag: unknown option (did you mean 'zero_stage'?)" in msg
    assert (
        "deepspeed.config.gradient_accumulation_steps: is set by the trainer; set "
        "train.mega_batch_factor instead"
    ) in msg
    assert "deepspeed.config.bf16: is set by the trainer; set precision instead" in msg
    assert "deepspeed.config.zero_optimization.stage: set deepspeed.zero_stage instead" in msg


def test_deepspeed_section_needs_the_deepspeed_engine(tmp_path):
    msg = config_error(tmp_path, deepspeed={"zero_stage": 1})
    assert "deepspeed: is set but engine is 'local'; add `engine: deepspeed`" in msg


def test_deepspeed_needs_one_step_per_network(tmp_path):
    msg = config_error(
        tmp_path,
        engine="deepspeed",
        steps={
            "again": {
                "training": "mlp",
                "optimizer_params": {"lr": 1e-3},
                "losses": {"mse2": {"type": "mse", "fake": "pred", "real": "y"}},
            }
        },
    )
    assert (
        "steps.again.training: network 'mlp' is already trained by steps.fit; engine "
        "'deepspeed' needs one step (one optimizer) per network"
    ) in msg


def test_deepspeed_fp16_needs_zero_stage_0(tmp_path):
    msg = config_error(tmp_path, engine="deepspeed", precision="fp16")
    assert "precision: fp16 with engine 'deepspeed' works with deepspeed.zero_stage 0" in msg
    if HAS_DEEPSPEED:
        make_experiment(tmp_path, engine="deepspeed", precision="fp16", deepspeed={"zero_stage": 0})


def test_missing_deepspeed_package_is_named(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    msg = config_error(tmp_path, engine="deepspeed")
    assert (
        "engine: engine 'deepspeed' needs the deepspeed package: pip install -e \".[deepspeed]\""
        in msg
    )
