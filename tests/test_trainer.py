"""End-to-end behaviour of ExtensibleTrainer on the toy plugin (CPU, seconds)."""

import math

import pytest
import torch
from safetensors import safe_open

from helpers import make_trainer, tb_scalars
from models import load_network
from trainer.component import TrainerEnv
from trainer.evaluators import Evaluator
from trainer.injectors import Injector
from utils.schema import ConfigError, Runtime


def test_trains_and_writes_run_folder(tmp_path):
    trainer = make_trainer(tmp_path, train={"niter": 60}, logger={"print_freq": 10})
    trainer.train()
    run = tmp_path / "toy"
    assert (run / "config.yml").is_file()
    assert (run / "models" / "60_mlp.safetensors").is_file()
    assert (run / "training_state" / "60.state").is_file()
    scalars = tb_scalars(run)
    for tag in (
        "loss/mse",
        "loss/mse_weighted",
        "loss/total",
        "lr/fit",
        "grad_norm/fit",
        "perf/samples_per_sec",
        "perf/step_time_s",
    ):
        assert tag in scalars, sorted(scalars)
    mse = [v for _, v in scalars["loss/mse"]]
    assert [s for s, _ in scalars["loss/mse"]] == list(range(10, 61, 10))
    assert mse[-1] < 0.5 * mse[0]  # it learns
    with safe_open(str(run / "models" / "60_mlp.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["which_model"] == "toy_mlp" and '"hidden": 32' in meta["kwargs"]
    net = load_network(run / "models" / "60_mlp.safetensors")  # no YAML needed
    x = torch.randn(3, 16)
    trainer.raw_networks["mlp"].eval(), net.eval()
    assert torch.allclose(net(x), trainer.raw_networks["mlp"](x))


@pytest.mark.parametrize("batch", [8, 10])
def test_gradient_accumulation_equals_full_batch(tmp_path, batch):
    """One SGD step: the weight change (= -lr * gradient) is the same with 1 or 4 micro-batches,
    also when the batch does not split evenly (10 -> 3, 3, 2, 2)."""
    deltas = []
    for factor in (1, 4):
        trainer = make_trainer(
            tmp_path / str(factor),
            train={"niter": 1, "mega_batch_factor": factor},
            datasets={"train": {"batch_size": batch, "shuffle": False}},
            steps={"fit": {"optimizer": "sgd", "optimizer_params": {"lr": 1.0}}},
        )
        before = {k: v.clone() for k, v in trainer.raw_networks["mlp"].state_dict().items()}
        trainer.train_step(next(trainer.loader))
        after = trainer.raw_networks["mlp"].state_dict()
        deltas.append({k: before[k] - after[k] for k in before})  # = gradient (lr 1)
    for k in deltas[0]:
        assert torch.allclose(deltas[0][k], deltas[1][k], atol=1e-6), k
    assert any(d.abs().sum() > 0 for d in deltas[0].values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    trainer = make_trainer(
        tmp_path, precision=precision, train={"niter": 30}, logger={"print_freq": 10}
    )
    trainer.train()
    assert trainer.engine.scaler.is_enabled() == (precision == "fp16")
    mse = [v for _, v in tb_scalars(tmp_path / "toy")["loss/mse"]]
    assert all(math.isfinite(v) for v in mse) and mse[-1] < mse[0]
    state = torch.load(tmp_path / "toy" / "training_state" / "30.state", weights_only=True)
    assert ("scale" in state["engine"]["scaler"]) == (precision == "fp16")


class NanAtStepInjector(Injector):
    """Test helper: multiplies its input by NaN on one step."""

    def __init__(self, nan_step: int, env: Runtime[TrainerEnv]) -> None:
        super().__init__()
        self.nan_step, self.env = nan_step, env

    def forward(self, state):
        x = state[self.input]
        return {self.output: x * float("nan") if self.env.step == self.nan_step else x}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_non_finite_gradient_skips_step(tmp_path, precision):
    trainer = make_trainer(
        tmp_path,
        precision=precision,
        train={"niter": 6},
        steps={
            "fit": {
                "injectors": {
                    "_replace": True,
                    "poison": {"type": "nan_at_step", "nan_step": 3, "in": "x", "out": "xp"},
                    "pred": {"type": "generator", "generator": "mlp", "in": "xp", "out": "pred"},
                }
            }
        },
    )
    weights, skipped = {}, {}

    def callback(step, logs):
        weights[step] = {k: v.clone() for k, v in trainer.raw_networks["mlp"].state_dict().items()}
        skipped[step] = trainer.counters.skipped_steps - sum(skipped.values())

    trainer.step_callbacks.append(callback)
    trainer.train()
    assert skipped[3] == 1
    for k in weights[2]:
        assert torch.equal(weights[2][k], weights[3][k]), k  # step 3 changed nothing
    assert all(torch.isfinite(v).all() for v in weights[6].values())
    assert not any(skipped[s] for s in (4, 5, 6))  # training goes on
    if precision == "fp32":
        assert trainer.counters.skipped_steps == 1
    # fp16: GradScaler's first steps overflow while it calibrates its scale; those count too
    assert tb_scalars(tmp_path / "toy")["train/skipped_steps"][-1] == (
        6,
        trainer.counters.skipped_steps,
    )


def test_ema_saved_beside_weights(tmp_path):
    trainer = make_trainer(tmp_path, train={"niter": 20, "ema_rate": 0.9})
    trainer.train()
    models = tmp_path / "toy" / "models"
    ema = load_network(models / "20_mlp_ema.safetensors").state_dict()
    raw = trainer.raw_networks["mlp"].state_dict()
    assert any(not torch.allclose(ema[k], raw[k]) for k in raw)  # an average, not a copy
    assert torch.equal(ema["head.weight"], trainer.ema["mlp"].module.head.weight.detach())


def test_keep_last_and_checkpoint_frequency(tmp_path):
    make_trainer(
        tmp_path, train={"niter": 12}, logger={"save_checkpoint_freq": 3, "keep_last": 2}
    ).train()
    run = tmp_path / "toy"
    assert sorted(p.name for p in (run / "training_state").iterdir()) == ["12.state", "9.state"]
    assert sorted(p.name for p in (run / "models").iterdir()) == [
        "12_mlp.safetensors",
        "9_mlp.safetensors",
    ]


def test_pretrained_initialisation(tmp_path):
    first = make_trainer(tmp_path / "a", train={"niter": 3})
    first.train()
    weights = tmp_path / "a" / "toy" / "models" / "3_mlp.safetensors"
    second = make_trainer(tmp_path / "b", path={"pretrain_model_mlp": str(weights)})
    for k, v in first.raw_networks["mlp"].state_dict().items():
        assert torch.equal(second.raw_networks["mlp"].state_dict()[k], v)
    with pytest.raises(ConfigError) as e:  # a wider network does not fit (found at validation)
        make_trainer(
            tmp_path / "c",
            path={"pretrain_model_mlp": str(weights)},
            networks={"mlp": {"kwargs": {"hidden": 48}}},
        )
    assert "strict_load" in str(e.value) and "body.0.weight" in str(e.value)
    deeper = make_trainer(
        tmp_path / "d",
        path={"pretrain_model_mlp": str(weights), "strict_load": False},
        networks={"mlp": {"kwargs": {"depth": 3}}},
    )
    assert torch.equal(
        deeper.raw_networks["mlp"].body[0].weight, first.raw_networks["mlp"].body[0].weight
    )


def test_validation_logs_mean_losses(tmp_path):
    trainer = make_trainer(
        tmp_path,
        train={"niter": 4, "val_freq": 2},
        datasets={"val": {"mode": "toy_regression", "batch_size": 5, "num_items": 23}},
    )
    trainer.train()
    val = tb_scalars(tmp_path / "toy")["val/mse"]
    assert [s for s, _ in val] == [2, 4]
    ds = trainer.datasets["val"]
    net = trainer.raw_networks["mlp"].eval()
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(net(ds.x), ds.y).item()
    assert val[-1][1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # 3-4 s: wandb's offline run
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_trainer(tmp_path, wandb=True, train={"niter": 2}, logger={"wandb_mode": "offline"}).train()
    assert list((tmp_path / "toy" / "wandb").glob("offline-run-*"))


class WeightNormEvaluator(Evaluator):
    """Test evaluator: reports the norm of a network's head (the EMA copy when there is one)."""

    def __init__(
        self,
        network: str,
        networks: Runtime[dict],
        env: Runtime[TrainerEnv],
        logger: Runtime[object],
    ) -> None:
        self.network, self.networks, self.env, self.logger = network, networks, env, logger

    def evaluate(self, step):
        assert step == self.env.step
        return {"head_norm": self.networks[self.network].head.weight.norm().item()}


def test_evaluators_run_every_n_steps(tmp_path):
    trainer = make_trainer(
        tmp_path,
        train={"niter": 6, "ema_rate": 0.5},
        eval={"every": 3, "evaluators": {"norms": {"type": "weight_norm", "network": "mlp"}}},
    )
    trainer.train()
    logged = tb_scalars(tmp_path / "toy")["eval/head_norm"]
    assert [s for s, _ in logged] == [3, 6]
    ema_norm = trainer.ema["mlp"].module.head.weight.norm().item()
    assert logged[-1][1] == pytest.approx(ema_norm, rel=1e-6)  # evaluators see the EMA weights


def test_evaluator_options_are_validated(tmp_path):
    from utils.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        make_trainer(
            tmp_path, eval={"evaluators": {"norms": {"type": "weight_norm", "netwrk": "mlp"}}}
        )
    problems = dict(e.value.problems)
    assert "did you mean 'network'" in problems["eval.evaluators.norms.netwrk"]
    assert "missing required" in problems["eval.evaluators.norms.network"]


def test_each_dataset_is_built_for_its_phase(tmp_path):
    trainer = make_trainer(
        tmp_path, datasets={"val": {"mode": "toy_regression", "batch_size": 4, "num_items": 64}}
    )
    train, val = trainer.datasets["train"], trainer.datasets["val"]
    assert not torch.equal(train.x, val.x)  # the toy draws other items for phase "val"
