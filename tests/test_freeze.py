"""Training part of a network: ``freeze`` patterns and ``param_groups`` of a step.

The toy MLP's parameters: body.0 (Linear 16->32), body.1 (LayerNorm), body.4 (Linear 32->32),
body.5 (LayerNorm), head (Linear 32->4); 1,860 in all.
"""

import importlib.util

import pytest
import torch

import train
from helpers import (
    launch,
    make_experiment,
    make_trainer,
    merge,
    tb_scalars,
    weights,
    write_yaml,
)
from models.audio.tts.unified_voice2 import UnifiedVoice2
from trainer.freeze import ParamGroupSpec, build_step_optimizer, select_parameters
from utils.errors import EXIT_USAGE, run_command
from utils.schema import ConfigError, Problems

FREEZE = ["body.0", "head.bias"]  # a module and one tensor
GROUPS = [
    {"match": "body.*", "lr": 1e-3, "beta1": 0.8},
    {"match": ["head.weight", "body.0.*"], "weight_decay": 0.0},  # body.0: frozen, freeze wins
]
PARTIAL = dict(
    steps={"fit": {"freeze": FREEZE, "param_groups": GROUPS, "optimizer_params": {"lr": 1e-2}}}
)
FROZEN = ("body.0.weight", "body.0.bias", "head.bias")


def problems_of(tmp_path, **sections) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, **sections)
    return dict(e.value.problems)


def snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.raw_networks["mlp"].state_dict().items()}


# ----------------------------------------------------------------------------- training
def test_frozen_weights_stay_bit_identical_while_the_others_move(tmp_path):
    trainer = make_trainer(tmp_path, **merge(PARTIAL, {"train": {"ema_rate": 0.9}}))
    net = trainer.raw_networks["mlp"]
    before = snapshot(trainer)
    trained = {id(p) for p in trainer.steps["fit"].params}
    for name, p in net.named_parameters():
        assert p.requires_grad == (name not in FROZEN), name
        assert (id(p) in trained) == (name not in FROZEN), name
    trainer.train()
    after, ema = snapshot(trainer), trainer.ema["mlp"].module.state_dict()
    for name in before:
        if name in FROZEN:
            assert torch.equal(after[name], before[name]), name
            assert torch.equal(ema[name], before[name]), name  # the EMA of a constant
        else:
            assert not torch.equal(after[name], before[name]), name
    saved = weights(tmp_path, 5)  # the checkpoint holds the whole network, frozen part too
    assert all(torch.equal(saved[k], before[k]) for k in FROZEN)


def test_param_groups_get_their_options_and_the_schedule_scales_each(tmp_path):
    sections = merge(
        PARTIAL,
        {
            "steps": {"fit": {"optimizer_params": {"lr": 1e-2, "weight_decay": 0.05}}},
            "train": {
                "niter": 6,
                "default_lr_scheme": "MultiStepLR",
                "gen_lr_steps": [4],
                "lr_gamma": 0.5,
                "warmup_iter": 2,
            },
        },
    )
    trainer = make_trainer(tmp_path, **sections)
    step = trainer.steps["fit"]
    groups = step.optimizer.param_groups
    # no rest (body.* takes every body parameter); each entry split by the optimizer into
    # decayed weights and undecayed biases and norms
    assert step.group_labels == ["body.*", "body.*", "head.weight,body.0.*"]
    names = {id(p): n for n, p in trainer.raw_networks["mlp"].named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [
        ["body.4.weight"],
        ["body.1.weight", "body.1.bias", "body.4.bias", "body.5.weight", "body.5.bias"],
        ["head.weight"],
    ]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0]
    assert [g["betas"] for g in groups] == [(0.8, 0.999), (0.8, 0.999), (0.9, 0.999)]
    bases = (1e-3, 1e-3, 1e-2)
    assert trainer.schedulers["fit"].base_lrs == list(bases)
    seen = [[g["lr"] for g in groups]]
    trainer.step_callbacks.append(lambda s, logs: seen.append([g["lr"] for g in groups]))
    trainer.train()
    # after s steps: base * min(1, (s + 1) / 2) (warmup) * 0.5 ** (s >= 4), each on its base
    factors = [0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert seen == [pytest.approx([b * f for b in bases]) for f in factors]


def test_warmup_scales_every_group(tmp_path):
    sections = merge(PARTIAL, {"train": {"niter": 5, "warmup_iter": 4}})
    trainer = make_trainer(tmp_path, **sections)
    groups = trainer.steps["fit"].optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / 4, 1e-3 / 4, 1e-2 / 4])


def test_start_up_logs_trainable_counts_per_group(tmp_path, caplog):
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, **PARTIAL)
    assert (
        "steps.fit: 1,312 of 1,860 parameters trainable (2 frozen patterns); groups: "
        "body.* 1,184 lr 0.001, head.weight,body.0.* 128 lr 0.01"
    ) in caplog.text
    with caplog.at_level("INFO"):
        make_trainer(tmp_path / "plain")
    assert "steps.fit: 1,860 of 1,860 parameters trainable\n" in caplog.text + "\n"


def test_the_rest_keeps_optimizer_params_and_is_logged_first(tmp_path, caplog):
    sections = dict(steps={"fit": {"param_groups": [{"match": "head", "lr": 1e-3}]}})
    with caplog.at_level("INFO"):
        trainer = make_trainer(tmp_path, **sections)
    assert trainer.steps["fit"].group_labels == ["rest", "rest", "head", "head"]
    assert "groups: rest 1,728 lr 0.01, head 132 lr 0.001" in caplog.text
    trainer.train()
    tags = tb_scalars(tmp_path / "toy")  # lr/fit: the first group's (the rest), and each group's
    assert tags["lr/fit"][-1][1] == pytest.approx(1e-2)
    assert tags["lr/fit/head"][-1][1] == pytest.approx(1e-3)


def test_steps_taking_turns_keep_the_frozen_part_out(tmp_path):
    """Two steps on one network: the trainer switches gradients per step, never on frozen
    parameters."""
    fit = {
        "training": "mlp",
        "freeze": ["body.0"],
        "optimizer_params": {"lr": 1e-2},
        "injectors": {"p2": {"type": "generator", "generator": "mlp", "in": "x", "out": "p2"}},
        "losses": {"l1": {"type": "l1", "fake": "p2", "real": "y"}},
    }
    trainer = make_trainer(tmp_path, steps={"fit": {"freeze": ["body.0"]}, "again": fit})
    before = snapshot(trainer)
    trainer.train()
    net = trainer.raw_networks["mlp"]
    assert not net.body[0].weight.requires_grad and net.body[0].weight.grad is None
    assert torch.equal(net.body[0].weight, before["body.0.weight"])
    assert not torch.equal(net.head.weight, before["head.weight"])


def test_what_the_network_keeps_fixed_stays_out_of_the_optimizer():
    """unified_voice2's own freeze_everything_but_position_embeddings (requires_grad false on
    all but the position tables) holds with freeze and param_groups as without them."""
    net = UnifiedVoice2(
        layers=1,
        model_dim=32,
        heads=4,
        number_text_tokens=50,
        start_text_token=49,
        number_mel_codes=100,
        start_mel_token=98,
        stop_mel_token=99,
        freeze_everything_but_position_embeddings=True,
    ).requires_grad_(True)  # as the trainer does to a trainable network
    group = ParamGroupSpec(["*pos_embedding*"], ["m"], {"lr": 1e-3}, "steps.s.param_groups[0]")
    problems = Problems()
    selection = select_parameters(
        net, "gpt", ["mel_head"], [group], {"lr": 1e-2}, "steps.s", problems
    )
    assert not problems.items
    optimizer, labels = build_step_optimizer("adamw", net, selection, "steps.s.optimizer")
    names = {id(p): n for n, p in net.named_parameters()}
    taken = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert taken == ["mel_pos_embedding.emb.weight", "text_pos_embedding.emb.weight"]
    assert labels == ["*pos_embedding*"] and not net.text_head.weight.requires_grad
    alone = ParamGroupSpec(["text_head"], ["m"], {}, "steps.s.param_groups[0]")
    select_parameters(net, "gpt", [], [alone], {"lr": 1e-2}, "steps.s", problems)
    assert "kept fixed by the network itself" in dict(problems.items)["steps.s.param_groups[0]"]


# ----------------------------------------------------------------------------- mistakes
def test_a_pattern_matching_nothing_fails_dry_run_with_the_path_and_names(tmp_path, capsys):
    path = write_yaml(tmp_path, base={}, steps={"fit": {"freeze": ["body.0", "haed.*"]}})
    assert run_command(train.main, ["-opt", path, "--dry-run"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "steps.fit.freeze[1]: no parameter of network 'mlp' matches 'haed.*'" in err
    assert "did you mean 'head.*'" in err
    assert "its 10 parameters: body.*, head.* (e.g. body.0.weight, head.weight)" in err


def test_dry_run_prints_what_is_trainable(tmp_path, capsys):
    path = write_yaml(tmp_path, base={}, **PARTIAL)
    assert run_command(train.main, ["-opt", path, "--dry-run"]) == 0
    assert "steps.fit: 1,312 of 1,860 parameters trainable" in capsys.readouterr().out


def test_every_pattern_and_group_option_is_checked(tmp_path):
    groups = [
        {"match": "body.*", "lrr": 1e-3},
        {"match": ["head.*", "tail.*"]},
        {"lr": 1e-3},
        {"match": "body.4.*"},  # taken by body.* already
        {"match": "body.0"},  # frozen
        "head.*",
    ]
    problems = problems_of(
        tmp_path, steps={"fit": {"freeze": ["body.0", "nope"], "param_groups": groups}}
    )
    assert "did you mean 'lr'" in problems["steps.fit.param_groups[0].lrr"]
    assert "matches 'tail.*'" in problems["steps.fit.param_groups[1].match[1]"]
    assert "missing required option" in problems["steps.fit.param_groups[2].match"]
    assert (
        "in steps.fit.param_groups[0] (the first matching group wins)"
        in (problems["steps.fit.param_groups[3]"])
    )
    assert "frozen (freeze wins over a group)" in problems["steps.fit.param_groups[4]"]
    assert "expected a mapping" in problems["steps.fit.param_groups[5]"]
    assert "matches 'nope'" in problems["steps.fit.freeze[1]"]
    assert len(problems) == 7, problems


def test_freezing_everything_and_disagreeing_steps_are_errors(tmp_path):
    problems = problems_of(tmp_path, steps={"fit": {"freeze": ["*"]}})
    assert "network 'mlp' has no parameter left to train" in problems["steps.fit.freeze"]
    other = {"training": "mlp", "optimizer_params": {"lr": 1e-2}}
    other["losses"] = {"l1": {"type": "l1", "fake": "pred", "real": "y"}}
    problems = problems_of(tmp_path, steps={"fit": {"freeze": ["head"]}, "again": other})
    assert "must freeze the same parameters" in problems["steps.again.freeze"]


def test_group_options_must_be_the_optimizers(tmp_path):
    problems = problems_of(
        tmp_path,
        steps={"fit": {"optimizer": "sgd", "param_groups": [{"match": "head", "beta1": 0.5}]}},
    )
    msg = problems["steps.fit.param_groups[0].beta1"]
    assert "unknown option" in msg and "momentum" in msg
    problems = problems_of(tmp_path, steps={"fit": {"param_groups": [{"match": "head", "lr": 0}]}})
    assert "must be > 0" in problems["steps.fit.param_groups[0].lr"]


# ----------------------------------------------------------------------------- resume
RESUME = merge(
    PARTIAL,
    dict(
        datasets={"train": {"batch_size": 6, "num_items": 50}},
        networks={"mlp": {"kwargs": {"dropout": 0.2}}},
        steps={"fit": {"clip_grad_eps": 0.5}},
        train={
            "niter": 12,
            "mega_batch_factor": 2,
            "default_lr_scheme": "CosineAnnealing",
            "warmup_iter": 3,
            "eta_min": 1e-4,
            "ema_rate": 0.9,
        },
        logger={"save_checkpoint_freq": 5},
    ),
)


class Killed(Exception):
    pass


def run(trainer, kill_at=None) -> dict[int, float]:
    losses: dict[int, float] = {}

    def callback(step, logs):
        losses[step] = logs["loss/mse"].item()
        if step == kill_at:
            raise Killed

    trainer.step_callbacks.append(callback)
    if kill_at is None:
        trainer.train()
    else:
        with pytest.raises(Killed):
            trainer.train()
    return losses


def test_resume_with_freeze_and_groups_matches_an_uninterrupted_run(tmp_path):
    straight = run(make_trainer(tmp_path / "straight", **RESUME))
    run(make_trainer(tmp_path / "resumed", **RESUME), kill_at=7)  # newest checkpoint: 5
    t = make_trainer(tmp_path / "resumed", **RESUME, path={"resume_state": "auto"})
    assert t.step == 5
    resumed = run(t)
    assert [resumed[s] for s in range(6, 13)] == [straight[s] for s in range(6, 13)]
    a, b = weights(tmp_path / "straight", 12), weights(tmp_path / "resumed", 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (weights(tmp_path / r, 12, ema=True) for r in ("straight", "resumed"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


FIRST = merge(PARTIAL, dict(train={"niter": 2}, logger={"save_checkpoint_freq": 2}))


def test_resume_with_another_layout_is_refused(tmp_path):
    make_trainer(tmp_path, **FIRST).train()
    changed = [
        ("freeze", {"freeze": ["body.0"]}),
        ("param_groups", {"param_groups": [{"match": "body.*", "lr": 1e-3}]}),
    ]
    for key, change in changed:
        with pytest.raises(ConfigError) as e:
            make_trainer(
                tmp_path,
                **merge(FIRST, {"steps": {"fit": {**change}}}),
                path={"resume_state": "auto"},
            )
        msg = dict(e.value.problems)[f"steps.fit.{key}"]
        assert "cannot carry over" in msg and "path.pretrain_model_mlp:" in msg, msg
    # the same layout written otherwise resumes: the freeze patterns as a set
    same = merge(FIRST, {"steps": {"fit": {"freeze": FREEZE[::-1]}}})
    assert make_trainer(tmp_path, **same, path={"resume_state": "auto"}).step == 2


def test_resume_applies_a_groups_changed_lr(tmp_path, caplog):
    make_trainer(tmp_path, **FIRST).train()
    groups = [{**GROUPS[0], "lr": 5e-4}, GROUPS[1]]
    with caplog.at_level("INFO"):
        t = make_trainer(
            tmp_path,
            **merge(FIRST, {"steps": {"fit": {"param_groups": groups}}}),
            path={"resume_state": "auto"},
        )
    assert [g["lr"] for g in t.steps["fit"].optimizer.param_groups] == [5e-4, 5e-4, 1e-2]
    assert "steps.fit lr: [0.001, 0.001, 0.01] -> [0.0005, 0.0005, 0.01]" in caplog.text


# ----------------------------------------------------------------------------- engines
@pytest.mark.slow
def test_ddp_and_deepspeed_train_the_same_part(tmp_path):
    """Two DDP ranks and DeepSpeed ZeRO-2 (one process) with freeze and param groups: the
    frozen weights are the initial ones and the rest match one local process."""
    sections = merge(PARTIAL, {"train": {"niter": 4}, "datasets": {"train": {"num_items": 40}}})
    local = make_trainer(tmp_path / "local", **sections)
    initial = snapshot(local)
    local.train()
    ddp = write_yaml(tmp_path / "ddp", base={}, **sections)
    launch([["-opt", ddp]], tmp_path, nproc=2, timeout=240)
    runs = {"ddp": weights(tmp_path / "ddp", 4)}
    if importlib.util.find_spec("deepspeed") is not None:
        ds = write_yaml(
            tmp_path / "ds", base={}, **sections, engine="deepspeed", deepspeed={"zero_stage": 2}
        )
        launch([["-opt", ds]], tmp_path, nproc=None, timeout=240)
        runs["deepspeed"] = weights(tmp_path / "ds", 4)
    reference = weights(tmp_path / "local", 4)
    for run_name, got in runs.items():
        for k in reference:
            if k in FROZEN:
                assert torch.equal(got[k], initial[k]), (run_name, k)
            else:
                torch.testing.assert_close(
                    got[k], reference[k], rtol=1e-4, atol=1e-5, msg=f"{run_name} {k}"
                )
