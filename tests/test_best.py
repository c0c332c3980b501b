"""Keep the best checkpoint of ``train.best_metric``; stop early when it stops improving."""

import json

import pytest

import train
from helpers import make_experiment, make_trainer, merge, tb_scalars, write_yaml
from trainer.component import TrainerEnv
from trainer.evaluators import Evaluator
from trainer.run_summary import run_summary
from utils.errors import run_command
from utils.schema import ConfigError, Runtime


class ScriptedEvaluator(Evaluator):
    """Test evaluator: logs ``eval/score`` = ``scores[step]``, a figure known in advance, so
    which step is the best does not hang on training."""

    def __init__(self, scores: dict, env: Runtime[TrainerEnv]) -> None:
        self.scores, self.env = scores, env

    def evaluate(self, step):
        return {"score": self.scores[step], "other": 0.0}


def scripted(scores: dict, **train) -> dict:
    """Sections of a toy run: ``eval/score`` every 2 steps, tracked with ``train`` options."""
    return dict(
        train={"niter": max(scores), "best_metric": "eval/score", **train},
        eval={"every": 2, "evaluators": {"s": {"type": "scripted", "scores": scores}}},
    )


class Killed(Exception):
    pass


def steps_of(folder):
    return sorted({int(p.name.split("_")[0]) for p in (folder / "models").glob("*.safetensors")})


SCORES = {2: 1.0, 4: 3.0, 6: 2.0, 8: 2.5, 10: 1.5, 12: 0.5}


def test_new_best_saved_kept_through_keep_last_1_and_released_by_the_next(tmp_path):
    sections = merge(scripted(SCORES), {"logger": {"save_checkpoint_freq": 4, "keep_last": 1}})
    trainer = make_trainer(tmp_path, **sections)
    seen = {}
    trainer.step_callbacks.append(lambda s, _: seen.setdefault(s, trainer.checkpoints.steps()))
    trainer.train()
    # step 2 is no save step (every 4) but the best: saved; step 4 (saved, every 4) is pruned
    # after step 8 by keep_last 1, while step 2 stays until step 12 beats it
    assert seen[3] == [2] and seen[9] == [2, 8] and seen[12] == [2, 8]
    assert trainer.checkpoints.steps() == [12] and steps_of(tmp_path / "toy") == [12]
    record = json.loads((tmp_path / "toy" / "best.json").read_text())
    assert record == {
        "metric": "eval/score",
        "mode": "min",
        "step": 12,
        "value": 0.5,
        "files": ["models/12_mlp.safetensors", "training_state/12.state"],
    }
    best = tb_scalars(tmp_path / "toy")["best/eval/score"]
    assert best == [(2, 1.0), (4, 1.0), (6, 1.0), (8, 1.0), (10, 1.0), (12, 0.5)]


@pytest.mark.parametrize("mode, step, value", [("min", 12, 0.5), ("max", 4, 3.0)])
def test_min_and_max_modes(tmp_path, mode, step, value):
    sections = merge(scripted(SCORES, best_mode=mode), {"logger": {"keep_last": 1}})
    trainer = make_trainer(tmp_path, **sections)
    trainer.train()
    assert (trainer.best.step, trainer.best.value) == (step, value)
    record = json.loads((tmp_path / "toy" / "best.json").read_text())
    assert (record["mode"], record["step"], record["value"]) == (mode, step, value)
    assert trainer.checkpoints.steps() == sorted({step, 12})  # the best and the last


def test_early_stop_after_patience_exits_0_with_the_best_named(tmp_path, capsys):
    scores = {2: 1.0, 4: 0.5, 6: 0.7, 8: 0.6, 10: 0.1, 12: 0.1}
    path = write_yaml(tmp_path, base={}, **scripted(scores, early_stop_patience=2))
    assert run_command(train.main, ["-opt", path]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "toy"
    assert (
        "early stop at step 8: eval/score has not improved for 2 measurement(s) "
        "(train.early_stop_patience 2); the best, 0.5 at step 4, is "
        f"{run / 'training_state' / '4.state'} with its network files, listed in "
        f"{run / 'best.json'}"
    ) in out
    assert "no better than 0.5 at step 4 (1 of train.early_stop_patience 2" in out
    assert (
        "stopped early: eval/score did not improve for 2 measurement(s) (train.early_stop_" in out
    )
    assert "best:         eval/score 0.5 (min) at step 4:" in out
    # saved where it stopped (to resume with more patience), and the best
    assert steps_of(run) == [2, 4, 8] and json.loads((run / "best.json").read_text())["step"] == 4


def test_summary_points_synthesis_at_the_best_network(tmp_path):
    trainer = make_trainer(tmp_path, **scripted(SCORES, best_mode="max"))
    trainer.train()
    (tmp_path / "toy" / "samples" / "12").mkdir(parents=True)
    (tmp_path / "toy" / "samples" / "12" / "a_ref.wav").write_bytes(b"")
    summary = run_summary(trainer)
    assert "best:         eval/score 3 (max) at step 4:" in summary
    assert "synthesize.py --model" in summary and "4_mlp.safetensors --prompt" in summary


def test_best_and_patience_survive_resume(tmp_path):
    """Killed at step 9 (the newest checkpoint is step 6, one measurement past the best) and
    resumed: the same best, count and stop step as an uninterrupted run."""
    scores = {0: 9.0, 2: 1.0, 4: 0.5, 6: 0.7, 8: 0.6, 10: 0.8, 12: 0.1, 14: 0.1}
    sections = merge(
        scripted(scores, early_stop_patience=3),
        {"logger": {"save_checkpoint_freq": 3}, "eval": {"at_start": True}},
    )
    straight = make_trainer(tmp_path / "straight", **sections)
    straight.train()
    assert (straight.step, straight.best.step, straight.best.since) == (10, 4, 3)

    killed = make_trainer(tmp_path / "resumed", **sections)

    def kill(step, _):
        if step == 9:
            raise Killed

    killed.step_callbacks.append(kill)
    with pytest.raises(Killed):
        killed.train()
    resumed = make_trainer(tmp_path / "resumed", **sections, path={"resume_state": "auto"})
    assert resumed.step == 6 and (resumed.best.step, resumed.best.since) == (4, 1)
    resumed.train()
    assert (resumed.step, resumed.best.state_dict()) == (10, straight.best.state_dict())
    for run in ("straight", "resumed"):
        assert steps_of(tmp_path / run / "toy") == [0, 2, 3, 4, 6, 9, 10]
    record = (tmp_path / "resumed" / "toy" / "best.json").read_text()
    assert record == (tmp_path / "straight" / "toy" / "best.json").read_text()
    # resumed once more, with patience run out: nothing to do
    again = make_trainer(tmp_path / "resumed", **sections, path={"resume_state": "auto"})
    again.train()
    assert again.step == 10


VAL = dict(
    datasets={"val": {"mode": "toy_regression", "batch_size": 8, "num_items": 16}},
    networks={"mlp": {"kwargs": {"dropout": 0.2}}},
    steps={"fit": {"optimizer_params": {"lr": 0.2}}},
    train={"niter": 30, "val_freq": 2, "best_metric": "val/mse", "early_stop_patience": 2},
    logger={"save_checkpoint_freq": 2, "keep_last": 1},
)


@pytest.mark.slow  # three trainings of some 20 steps, with a validation and a save every 2
def test_val_metric_resume_matches_uninterrupted_run(tmp_path):
    """Killed the step before the early stop, resumed from the measurement before it: one
    measurement without improvement carries over, and the run stops where the other did."""
    straight = make_trainer(tmp_path / "straight", **VAL)
    straight.train()
    assert straight.stopped_early and straight.step < 30
    killed = make_trainer(tmp_path / "resumed", **VAL)
    stop = straight.step - 1

    def kill(step, _):
        if step == stop:
            raise Killed

    killed.step_callbacks.append(kill)
    with pytest.raises(Killed):
        killed.train()
    resumed = make_trainer(tmp_path / "resumed", **VAL, path={"resume_state": "auto"})
    assert resumed.step == stop - 1 and resumed.best.since == 1
    resumed.train()
    assert resumed.step == straight.step
    assert resumed.best.state_dict() == straight.best.state_dict()
    record = (tmp_path / "resumed" / "toy" / "best.json").read_text()
    assert record == (tmp_path / "straight" / "toy" / "best.json").read_text()


# ----------------------------------------------------------------------------- bad options
def problems_of(tmp_path, **sections) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, **sections)
    return e.value.problems


def test_misspelled_val_metric_fails_at_dry_run(tmp_path, capsys):
    path = write_yaml(
        tmp_path,
        base={},
        datasets=VAL["datasets"],
        train={"val_freq": 2, "best_metric": "val/mes"},
    )
    assert run_command(train.main, ["-opt", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.best_metric: 'val/mes' names no loss (did you mean 'val/mse'?)" in err


@pytest.mark.parametrize(
    "sections, key, says",
    [
        ({"train": {"best_metric": "val/mse"}}, "train.best_metric", "add datasets.val"),
        ({"train": {"best_metric": "val/mse"}}, "train.best_metric", "set train.val_freq"),
        ({"train": {"best_metric": "eval/x"}}, "train.best_metric", "add eval.evaluators"),
        ({"train": {"best_metric": "eval/x"}}, "train.best_metric", "set eval.every"),
        ({"train": {"best_metric": "loss/mse"}}, "train.best_metric", "did you mean 'val/mse'"),
        ({"train": {"best_metric": "eval/"}}, "train.best_metric", "or eval/<scalar>"),
        ({**VAL, "train": {"best_mode": "mx"}}, "train.best_mode", "did you mean 'max'"),
        ({"train": {"early_stop_patience": 3}}, "train.early_stop_patience", "best_metric is not"),
        ({**VAL, "train": {"early_stop_patience": 0}}, "train.early_stop_patience", ">= 1"),
    ],
)
def test_bad_best_options(tmp_path, sections, key, says):
    messages = [m for k, m in problems_of(tmp_path, **sections) if k == key]
    assert any(says in m for m in messages), messages


def test_misspelled_eval_metric_fails_at_first_evaluation(tmp_path, capsys):
    sections = scripted(SCORES)
    sections["train"]["best_metric"] = "eval/scor"
    path = write_yaml(tmp_path, base={}, **sections)
    assert run_command(train.main, ["-opt", path]) == 2
    err = capsys.readouterr().err
    assert (
        "train.best_metric: 'eval/scor' is not among the scalars the evaluators logged at "
        "step 2 (did you mean 'eval/score'"
    ) in err
    assert "they logged: eval/other, eval/score. A checkpoint of step 2 was saved" in err
    assert steps_of(tmp_path / "toy") == [2]


def two_evaluators(metric: str) -> dict:
    """Two scripted evaluators, ``a`` (SCORES) and ``b`` (the opposite ranking)."""
    sections = scripted(SCORES)
    sections["train"]["best_metric"] = metric
    sections["eval"]["evaluators"]["b"] = {
        "type": "scripted",
        "scores": {k: -v for k, v in SCORES.items()},
    }
    sections["eval"]["evaluators"]["a"] = sections["eval"]["evaluators"].pop("s")
    return sections


def test_several_evaluators_log_under_their_names_and_best_can_pick_one(tmp_path):
    trainer = make_trainer(tmp_path, **two_evaluators("eval/b/score"))
    trainer.train()
    scalars = tb_scalars(tmp_path / "toy")
    # two evaluators return "score": each keeps its own, neither overwrites the other
    assert scalars["eval/a/score"][-1] == (12, 0.5) and scalars["eval/b/score"][-1] == (12, -0.5)
    assert "eval/score" not in scalars
    assert (trainer.best.step, trainer.best.value) == (4, -3.0)  # b's lowest


@pytest.mark.parametrize(
    "metric, says",
    [
        ("eval/score", "logged as eval/<evaluator>/<scalar>, e.g. eval/b/score"),
        ("eval/c/score", "with several evaluators (b, a)"),
    ],
)
def test_best_metric_of_several_evaluators_must_name_one(tmp_path, metric, says):
    messages = [
        m for k, m in problems_of(tmp_path, **two_evaluators(metric)) if k == "train.best_metric"
    ]
    assert any(says in m for m in messages), messages


def test_best_metric_of_one_evaluator_has_no_evaluator_name(tmp_path):
    sections = scripted(SCORES)
    sections["train"]["best_metric"] = "eval/s/score"
    messages = [m for k, m in problems_of(tmp_path, **sections) if k == "train.best_metric"]
    assert any("its scalars are logged as eval/<scalar>: eval/score" in m for m in messages)
