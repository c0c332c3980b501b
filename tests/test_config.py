"""Every start-up error a user can trigger, and DLAS spellings."""

import pytest
import torch

from helpers import REPO, make_experiment, make_trainer, toy_options
from trainer.config import validate_experiment
from utils.options import load_options, options_from_dict
from utils.schema import ConfigError


def problems_of(tmp_path, **sections) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, **sections)
    return dict(e.value.problems)


def test_valid_toy_experiment(tmp_path):
    exp = make_experiment(tmp_path)
    assert exp.train.niter == 5 and exp.precision == "fp32"
    assert exp.steps["fit"].optimizer_params == {"lr": 1e-2}
    assert exp.run_dir == tmp_path.resolve() / "toy"


@pytest.mark.parametrize(
    "sections, path, hint",
    [
        ({"traim": {}}, "traim", "did you mean 'train'"),
        ({"train": {"niterr": 3}}, "train.niterr", "did you mean 'niter'"),
        (
            {"train": {"gen_lr_step": [3], "default_lr_scheme": "MultiStepLR"}},
            "train.gen_lr_step",
            "did you mean 'gen_lr_steps'",
        ),
        ({"logger": {"print_frq": 3}}, "logger.print_frq", "did you mean 'print_freq'"),
        (
            {"datasets": {"train": {"num_itmes": 3}}},
            "datasets.train.num_itmes",
            "did you mean 'num_items'",
        ),
        (
            {"datasets": {"train": {"batch_szie": 3}}},
            "datasets.train.batch_szie",
            "did you mean 'batch_size'",
        ),
        (
            {"networks": {"mlp": {"kwargs": {"hiden": 3}}}},
            "networks.mlp.kwargs.hiden",
            "did you mean 'hidden'",
        ),
        (
            {"steps": {"fit": {"optimizer_params": {"weight_dacay": 0.1}}}},
            "steps.fit.optimizer_params.weight_dacay",
            "did you mean 'weight_decay'",
        ),
        (
            {"steps": {"fit": {"injectors": {"pred": {"generater": "mlp"}}}}},
            "steps.fit.injectors.pred.generater",
            "did you mean 'generator'",
        ),
        (
            {"steps": {"fit": {"losses": {"mse": {"fakes": "pred"}}}}},
            "steps.fit.losses.mse.fakes",
            "did you mean 'fake'",
        ),
        (
            {"steps": {"fit": {"clip_grad_epsilon": 1.0}}},
            "steps.fit.clip_grad_epsilon",
            "did you mean 'clip_grad_eps'",
        ),
        ({"path": {"resume_stat": "auto"}}, "path.resume_stat", "did you mean 'resume_state'"),
    ],
)
def test_unknown_key_has_full_path_and_suggestion(tmp_path, sections, path, hint):
    problems = problems_of(tmp_path, **sections)
    assert path in problems, problems
    assert hint in problems[path]


@pytest.mark.parametrize(
    "sections, path, expected",
    [
        ({"train": {"niter": "ten"}}, "train.niter", "expected int, got str 'ten'"),
        ({"logger": {"print_freq": 1.5}}, "logger.print_freq", "expected int"),
        ({"steps": {"fit": {"clip_grad_eps": "big"}}}, "steps.fit.clip_grad_eps", "expected float"),
        (
            {"steps": {"fit": {"optimizer_params": {"lr": "fast"}}}},
            "steps.fit.optimizer_params.lr",
            "expected float",
        ),
        ({"precision": "fp8"}, "precision", "expected one of 'fp32', 'bf16', 'fp16'"),
        (
            {"networks": {"mlp": {"kwargs": {"hidden": [3]}}}},
            "networks.mlp.kwargs.hidden",
            "expected int",
        ),
        (
            {"steps": {"fit": {"injectors": {"pred": {"in": 5}}}}},
            "steps.fit.injectors.pred.in",
            "expected str or list of str",
        ),
    ],
)
def test_wrong_type(tmp_path, sections, path, expected):
    problems = problems_of(tmp_path, **sections)
    assert expected in problems[path], problems


def test_missing_required(tmp_path):
    problems = problems_of(
        tmp_path,
        train={"_replace": True, "val_freq": 3},
        steps={
            "fit": {
                "optimizer_params": {"_replace": True},
                "losses": {"mse": {"_replace": True, "type": "mse", "fake": "pred"}},
            }
        },
    )
    assert "missing required option (int >= 1)" in problems["train.niter"]
    assert "missing required option" in problems["steps.fit.optimizer_params.lr"]
    assert "missing required option" in problems["steps.fit.losses.mse.real"]


def test_val_freq_needs_val_dataset(tmp_path):
    problems = problems_of(tmp_path, train={"val_freq": 3})
    assert "no datasets.val" in problems["train.val_freq"]


@pytest.mark.parametrize(
    "sections, path, name",
    [
        (
            {"steps": {"fit": {"injectors": {"pred": {"type": "generatr"}}}}},
            "steps.fit.injectors.pred.type",
            "generator",
        ),
        (
            {"steps": {"fit": {"losses": {"mse": {"type": "mes"}}}}},
            "steps.fit.losses.mse.type",
            "mse",
        ),
        (
            {"networks": {"mlp": {"which_model_G": "toy_mpl"}}},
            "networks.mlp.which_model_G",
            "toy_mlp",
        ),
        (
            {"datasets": {"train": {"mode": "toy_regresion"}}},
            "datasets.train.mode",
            "toy_regression",
        ),
        ({"train": {"default_lr_scheme": "MultiStepLr"}}, "train.default_lr_scheme", "MultiStepLR"),
        ({"steps": {"fit": {"optimizer": "adamww"}}}, "steps.fit.optimizer", "adamw"),
        ({"steps": {"fit": {"training": "mlpp"}}}, "steps.fit.training", "mlp"),
    ],
)
def test_unknown_component_name_lists_closest(tmp_path, sections, path, name):
    problems = problems_of(tmp_path, **sections)
    assert f"did you mean '{name}'" in problems[path], problems


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_experiment(
            tmp_path,
            train={"niterr": 3},
            logger={"print_frq": 1},
            steps={"fit": {"optimizer": "adamww"}},
        )
    msg = str(e.value)
    for path in ("train.niterr", "logger.print_frq", "steps.fit.optimizer"):
        assert path in msg
    assert msg.startswith("3 problems")


def test_missing_state_key_fails_at_startup(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_trainer(
            tmp_path,
            steps={"fit": {"injectors": {"pred": {"in": "xx"}}, "losses": {"mse": {"real": "yy"}}}},
        )
    problems = dict(e.value.problems)
    assert "not in the batch (x, y, index)" in problems["steps.fit.injectors.pred.in"]
    assert "'x'" in problems["steps.fit.injectors.pred.in"]  # did you mean
    assert "'yy'" in problems["steps.fit.losses.mse"]
    assert not (tmp_path / "toy" / "models").exists()  # nothing trained


def test_output_may_not_overwrite(tmp_path):
    with pytest.raises(ConfigError, match="'y' already exists"):
        make_trainer(tmp_path, steps={"fit": {"injectors": {"pred": {"out": "y"}}}})


def test_eval_only_injector_output_not_available_in_training(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_trainer(tmp_path, steps={"fit": {"injectors": {"pred": {"train": False}}}})
    assert "'pred'" in dict(e.value.problems)["steps.fit.losses.mse"]


def test_dlas_spellings(tmp_path, caplog):
    exp = make_experiment(
        tmp_path,
        fp16=True,
        scale=1,
        logger={"visuals": ["gen"]},
        train={
            "mega_batch_factor": 2,
            "warmup_iter": -1,
            "val_freq": 2,
            "default_lr_scheme": "MultiStepLR",
            "gen_lr_steps": [2, 4],
            "lr_gamma": 0.5,
        },
        datasets={"val": {"mode": "toy_regression", "batch_size": 4}},
    )
    assert exp.precision == "fp16"
    assert exp.train.mega_batch_factor == 2
    assert exp.train.scheduler_kwargs == {
        "gen_lr_steps": [2, 4],
        "lr_gamma": 0.5,
        "warmup_iter": -1,
    }
    assert any("'scale' has no effect" in r.message for r in caplog.records)
    assert exp.logger.visuals == ["gen"]


def test_relative_paths_resolve_against_yaml_folder(tmp_path):
    exp = make_experiment(tmp_path, path={"root": "runs/a", "resume_state": "runs/a/x.state"})
    assert exp.run_dir == tmp_path.resolve() / "runs" / "a"
    assert exp.path.resume_state == str(tmp_path.resolve() / "runs" / "a" / "x.state")


def test_pretrain_key_for_unknown_network(tmp_path):
    problems = problems_of(tmp_path, path={"pretrain_model_mpl": "x.safetensors"})
    assert "did you mean 'mlp'" in problems["path.pretrain_model_mpl"]


@pytest.mark.parametrize("yml", sorted(p.name for p in (REPO / "experiments").glob("*.yml")))
def test_shipped_experiments_validate(yml):
    exp = validate_experiment(load_options(REPO / "experiments" / yml))
    assert exp.name and exp.train.niter > 0


def test_loss_names_unique_across_steps(tmp_path):
    second = {
        "training": "mlp",
        "optimizer_params": {"lr": 0.1},
        "losses": {"mse": {"type": "mse", "fake": "pred", "real": "y"}},
    }
    problems = problems_of(tmp_path, steps={"again": second})
    assert "already declared in steps.fit" in problems["steps.again.losses.mse"]


def test_val_loader_options_without_effect_warn(tmp_path, caplog):
    make_experiment(
        tmp_path,
        datasets={
            "val": {"mode": "toy_regression", "batch_size": 4, "shuffle": True, "drop_last": False}
        },
    )
    warned = [r.message for r in caplog.records if "has no effect" in r.message]
    assert any("datasets.val.shuffle" in m for m in warned)
    assert any("datasets.val.drop_last" in m for m in warned)
    caplog.clear()
    make_experiment(tmp_path, datasets={"train": {"shuffle": False}})
    assert not [r for r in caplog.records if "has no effect" in r.message]


def test_network_type_must_agree_with_which_model(tmp_path):
    problems = problems_of(tmp_path, networks={"mlp": {"type": "discriminator"}})
    assert "which_model_G (a generator)" in problems["networks.mlp.type"]


def test_values_are_checked_not_only_types(tmp_path):
    problems = problems_of(
        tmp_path,
        datasets={"train": {"batch_size": 0}},
        train={"niter": 10, "warmup_iter": 10, "ema_rate": 1.0},
        logger={"print_freq": 0, "save_checkpoint_freq": -5, "keep_last": 0},
        eval={"every": -1},
        steps={"fit": {"clip_grad_eps": -1, "optimizer_params": {"lr": 0.0}}},
        networks={"mlp": {"kwargs": {"hidden": 32, "dropout": 1.5}}},
    )
    assert problems["datasets.train.batch_size"] == "must be >= 1, got 0"
    assert "not fewer than train.niter (10)" in problems["train.warmup_iter"]
    assert problems["train.ema_rate"] == "must be > 0 and < 1, got 1.0"
    assert problems["logger.print_freq"] == "must be >= 1, got 0"
    assert problems["logger.save_checkpoint_freq"] == "must be >= 1, got -5"
    assert problems["logger.keep_last"] == "must be >= 1, got 0"
    assert problems["eval.every"] == "must be >= 1, got -1"
    assert problems["steps.fit.clip_grad_eps"] == "must be > 0, got -1.0"
    assert problems["steps.fit.optimizer_params.lr"] == "must be > 0, got 0.0"


def test_model_constructor_checks_run_at_validation(tmp_path):
    valle = {"which_model_G": "valle", "kwargs": {"d_model": 60, "n_heads": 8, "dropout": 1.0}}
    problems = problems_of(tmp_path, networks={"_replace": True, "mlp": valle})
    assert problems["networks.mlp.kwargs.dropout"] == "must be >= 0 and < 1, got 1.0"
    problems = problems_of(
        tmp_path,
        networks={"_replace": True, "mlp": {**valle, "kwargs": {"d_model": 60, "n_heads": 8}}},
    )
    assert "must split into n_heads (8)" in problems["networks.mlp.kwargs"]


def test_fp16_and_precision_must_agree(tmp_path):
    problems = problems_of(tmp_path, fp16=True, precision="bf16")
    assert "they disagree" in problems["fp16"]
    assert make_experiment(tmp_path, fp16=True, precision="fp16").precision == "fp16"


def test_generator_must_name_a_network(tmp_path):
    problems = problems_of(tmp_path, steps={"fit": {"injectors": {"pred": {"generator": "mpl"}}}})
    assert (
        "no network called 'mpl' (did you mean 'mlp'?)"
        in problems["steps.fit.injectors.pred.generator"]
    )


def test_pretrained_files_are_checked(tmp_path):
    from utils.io import save_network

    problems = problems_of(tmp_path, path={"pretrain_model_mlp": "missing.safetensors"})
    assert problems["path.pretrain_model_mlp"].endswith("missing.safetensors does not exist")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    problems = problems_of(tmp_path, path={"pretrain_model_mlp": "broken.safetensors"})
    assert "not a readable safetensors file" in problems["path.pretrain_model_mlp"]
    save_network(
        torch.nn.Linear(2, 2), tmp_path / "other.safetensors", which_model="linear", kwargs={}
    )
    problems = problems_of(tmp_path, path={"pretrain_model_mlp": "other.safetensors"})
    assert (
        "holds a 'linear' network, but networks.mlp is a 'toy_mlp'"
        in problems["path.pretrain_model_mlp"]
    )


def test_dlas_eval_keys_and_ema_enabled(tmp_path, caplog):
    exp = make_experiment(
        tmp_path,
        train={"ema_enabled": True},
        eval={"output_state": "gen", "injectors": {"x": {"type": "generator"}}, "pure": True},
    )
    assert exp.train.ema_rate == 0.999  # DLAS's rate when only ema_enabled is given
    for key in ("output_state", "injectors", "pure"):
        assert any(f"eval.{key}: DLAS option" in r.message for r in caplog.records), key
    assert make_experiment(tmp_path, train={"ema_enabled": False}).train.ema_rate is None
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, train={"ema_enabled": False, "ema_rate": 0.99})
    assert "disagree" in dict(e.value.problems)["train.ema_enabled"]


def test_gpu_ids_without_a_gpu_says_how_to_use_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = toy_options(gpu_ids=[0])
    options.pop("device")
    with pytest.raises(ConfigError) as e:
        validate_experiment(options_from_dict(options, tmp_path))
    assert "-o device=cpu" in dict(e.value.problems)["gpu_ids"]
    options["device"] = "cpu"  # -o device=cpu wins over gpu_ids
    assert validate_experiment(options_from_dict(options, tmp_path)).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    options.pop("device")
    options["gpu_ids"] = [3]
    with pytest.raises(ConfigError) as e:
        validate_experiment(options_from_dict(options, tmp_path))
    assert "has 1 GPU(s)" in dict(e.value.problems)["gpu_ids"]
