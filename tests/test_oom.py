"""A batch that runs out of memory is skipped (no update, no step), counted and described; a
streak of them saves and stops with exit code 6; the count survives resume; under DDP every
rank skips together; DeepSpeed keeps it fatal."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

import train
from helpers import (
    NITER,
    SECTIONS,
    TOY_PLUGIN,
    launch,
    logged,
    make_trainer,
    merge,
    tb_scalars,
    weights,
    write_yaml,
)
from trainer.oom import BatchOutOfMemory, OomGuard, describe_batch
from utils.errors import run_command

PLUGIN = str(Path(__file__).with_name("oom_plugin.py"))
SHAPES = "batch of 8 items: x [8, 16], y [8, 4], index [8]"


def oom_sections(oom_at, phase="forward", before_network=False, ranks=None, **train) -> dict:
    """The toy run with a ``fake_oom`` injector after the network (or before it), which runs
    out of memory on the training calls ``oom_at`` (one call per micro-batch)."""
    src, out = ("x", "xc") if before_network else ("pred", "pred_c")
    oom = {"type": "fake_oom", "oom_at": oom_at, "phase": phase, "in": src, "out": out}
    if ranks is not None:
        oom["ranks"] = ranks
    net_in = "xc" if before_network else "x"
    pred = {"type": "generator", "generator": "mlp", "in": net_in, "out": "pred"}
    # in order by name too: write_yaml sorts the keys
    injectors = {"oom": oom, "pred": pred} if before_network else {"net": pred, "oom": oom}
    return dict(
        plugins=[TOY_PLUGIN, PLUGIN],
        steps={
            "fit": {
                "injectors": {"_replace": True, **injectors},
                "losses": {"mse": {"fake": "pred" if before_network else "pred_c"}},
            }
        },
        train={"niter": 6, **train},
    )


class DroppingLoader:
    """The trainer's loader without the batches numbered in ``drop`` (1-based)."""

    def __init__(self, loader, drop):
        self.loader, self.drop, self.n = loader, set(drop), 0

    def __getattr__(self, name):  # epoch, state_dict ...
        return getattr(self.loader, name)

    def __next__(self):
        while True:
            self.n += 1
            batch = next(self.loader)
            if self.n not in self.drop:
                return batch


def net_state(trainer):
    return {k: v.clone() for k, v in trainer.raw_networks["mlp"].state_dict().items()}


@pytest.mark.parametrize(
    "phase, factor, oom_at, dropped, precision",
    [
        ("forward", 1, [3, 4], {3, 4}, "fp32"),
        ("backward", 1, [3, 4], {3, 4}, "fp32"),
        # the second micro-batch of batch 3, after the first one's gradients accumulated
        ("forward", 2, [6], {3}, "fp32"),
        ("backward", 2, [5, 7], {3, 4}, "fp32"),
        ("backward", 1, [2], {2}, "fp16"),  # the GradScaler is left as it was
    ],
)
def test_oom_batches_are_skipped_as_if_never_seen(
    tmp_path, caplog, phase, factor, oom_at, dropped, precision
):
    sections = oom_sections(oom_at, phase, mega_batch_factor=factor)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tmp_path / "oom", precision=precision, **sections)
        trainer.train()
    assert trainer.step == 6 and trainer.counters.oom_skipped == len(dropped)
    assert logged(tmp_path / "oom", "train/oom_skipped")[-1] == len(dropped)
    # the same run on the batches left over, without any error: bit for bit the same weights
    sections = oom_sections([], mega_batch_factor=factor)
    reference = make_trainer(tmp_path / "ref", precision=precision, **sections)
    reference.loader = DroppingLoader(reference.loader, dropped)
    reference.train()
    got, want = net_state(trainer), net_state(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if precision == "fp16":
        assert trainer.engine.scaler.state_dict() == reference.engine.scaler.state_dict()

    warnings = [r.getMessage() for r in caplog.records if "batch skipped" in r.getMessage()]
    assert len(warnings) == len(dropped)
    micro = f" (micro-batch {(oom_at[0] - 1) % 2 + 1} of 2)" if factor == 2 else ""
    assert f"in the {phase} of step 'fit'{micro} on a {SHAPES}" in warnings[0]
    assert "(CUDA out of memory. Tried to allocate" in warnings[0]
    # the failed graph was freed before the next batch
    injector = trainer.steps["fit"].injectors[1]
    assert injector.failed_alive == [False] * len(oom_at)


def test_skipped_batch_leaves_weights_and_step_alone(tmp_path):
    trainer = make_trainer(tmp_path, **oom_sections([3]))
    seen = {}
    trainer.step_callbacks.append(lambda step, logs: seen.setdefault(step, net_state(trainer)))
    trainer.train()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]  # batch 3 made no step; batch 4 made step 3
    assert trainer.counters.oom_skipped == 1


def test_streak_saves_and_exits_6_then_resumes(tmp_path, capsys):
    path = write_yaml(
        tmp_path,
        base={},
        **oom_sections([3, 4, 5], niter=8, max_oom_streak=3),
        logger={"save_checkpoint_freq": 2},
    )
    assert run_command(train.main, ["-opt", path]) == 6
    err = capsys.readouterr().err
    state = tmp_path / "toy" / "training_state" / "2.state"
    assert err.startswith("error: stopping: 3 batches in a row ran out of memory after step 2")
    assert err.count(f"in the forward of step 'fit' on a {SHAPES}") == 3
    assert "Tried to allocate 5.00 GiB" in err
    for remedy in (
        "datasets.train.batch_size",
        "max_tokens",
        "max_wav_length",
        "train.mega_batch_factor",
        "checkpointing_enabled",
        f"path.resume_state={state}",
        "train.max_oom_streak",
    ):
        assert remedy in err, remedy
    assert "Traceback" not in err
    assert state.is_file()
    saved = torch.load(state, weights_only=True)
    assert saved["counters"]["oom_skipped"] == 3 and saved["loader"]["batches_done"] == 5
    assert tb_scalars(tmp_path / "toy")["train/oom_skipped"][-1] == (2, 3.0)

    resume = ["-opt", path, "-o", f"path.resume_state={state}"]
    assert run_command(train.main, [*resume, "-o", "steps.fit.injectors.oom.oom_at=[]"]) == 0
    final = torch.load(tmp_path / "toy" / "training_state" / "8.state", weights_only=True)
    assert final["counters"]["oom_skipped"] == 3  # the count goes on from the checkpoint


def test_streak_option(tmp_path):
    trainer = make_trainer(tmp_path, **oom_sections([2, 3, 5, 6], max_oom_streak=None))
    trainer.train()
    assert trainer.step == 6 and trainer.counters.oom_skipped == 4
    # two in a row never reach a limit of 3; a good step ends each streak
    trainer = make_trainer(tmp_path / "b", **oom_sections([2, 3, 5, 6], max_oom_streak=3))
    trainer.train()
    assert trainer.step == 6


def test_resume_after_a_skipped_batch_is_exact(tmp_path):
    straight = make_trainer(tmp_path / "straight", **oom_sections([3]))
    straight.train()
    first = make_trainer(tmp_path / "resumed", **oom_sections([3], niter=4))
    first.train()
    resumed = make_trainer(tmp_path / "resumed", **oom_sections([]), path={"resume_state": "auto"})
    assert resumed.step == 4 and resumed.counters.oom_skipped == 1
    resumed.train()
    a, b = weights(tmp_path / "straight", 6), weights(tmp_path / "resumed", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.counters.oom_skipped == 1


def test_guard_lets_other_errors_through():
    guard = OomGuard(world_size=1)
    with pytest.raises(BatchOutOfMemory) as e, guard.region("the forward of step 'x'"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ...")
    assert e.value.message == "CUDA out of memory. Tried to allocate 2.00 GiB"
    with pytest.raises(RuntimeError, match="not memory"), guard.region("the forward"):
        raise RuntimeError("not memory")


def test_describe_batch():
    batch = {"wav": torch.zeros(16, 1000), "codes": torch.zeros(16, 4, 30), "text": ["a"] * 16}
    assert describe_batch(batch) == "16 items: wav [16, 1000], codes [16, 4, 30]"


# ------------------------------------------------------------------------------------- DDP
@pytest.mark.slow  # torchrun launches
def test_ddp_ranks_skip_together(tmp_path):
    """Rank 1 alone runs out of memory; both ranks skip the batch and end with the weights of
    one process that skipped the same global batch. ``inside``: inside the network's forward
    in the second micro-batch (DDP on rank 0, whose forward finished, expects a backward that
    never comes); ``before``: before a network with a buffer (DDP broadcasts it as each forward
    starts); ``backward``: in the backward of the first micro-batch (the second one's backward
    all-reduces the gradients: an out-of-memory error there stays fatal under DDP);
    ``streak``: rank 1's shapes reach rank 0's error message, after a checkpoint every rank
    took part in."""

    def buffered(**kwargs):
        return {"mlp": {"which_model_G": "buffered_linear", "kwargs": {"_replace": True, **kwargs}}}

    runs = {
        "inside": {
            **oom_sections([], ranks=[1], niter=NITER, mega_batch_factor=2),
            "networks": buffered(oom_at=[6], ranks=[1]),
        },
        "before": {
            **oom_sections([3], before_network=True, ranks=[1], niter=NITER),
            "networks": buffered(),
        },
        "backward": oom_sections([5], "backward", ranks=[1], niter=NITER, mega_batch_factor=2),
        "streak": oom_sections([3, 4], ranks=[1], niter=NITER, max_oom_streak=2),
    }
    argv = [["-opt", write_yaml(tmp_path / name, **s)] for name, s in runs.items()]
    out = launch(argv, tmp_path, nproc=2, check=False)  # the streak run last
    assert out.returncode != 0  # the streak run, last, exits with 6
    assert "error: stopping: 2 batches in a row ran out of memory after step 2" in out.stderr
    assert "rank 1: in the forward of step 'fit' on a batch of 4 items: x [4, 16]" in out.stderr
    assert "[rank 1] error" not in out.stderr  # the error is every rank's: rank 0 prints it
    assert (tmp_path / "streak" / "toy" / "training_state" / "2.state").is_file()

    for name in ("inside", "before", "backward"):
        sections = merge(SECTIONS, runs[name])  # (merge consumed the "_replace" marks)
        sections["steps"]["fit"]["injectors"].update(_replace=True)
        sections["steps"]["fit"]["injectors"]["oom"]["oom_at"] = []
        if name != "backward":
            sections["networks"] = buffered()
        single = make_trainer(tmp_path / f"{name}_single", **sections)
        single.loader = DroppingLoader(single.loader, {3})
        single.train()
        ddp, one = weights(tmp_path / name, NITER), net_state(single)
        for k in one:
            torch.testing.assert_close(ddp[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
        assert logged(tmp_path / name, "train/oom_skipped")[-1] == 1


@pytest.mark.slow  # a process of its own: DeepSpeed makes a process group
@pytest.mark.skipif(not importlib.util.find_spec("deepspeed"), reason="deepspeed not installed")
def test_deepspeed_does_not_skip(tmp_path):
    """DeepSpeed's gradient buckets and counters cannot be rolled back: the error stays fatal."""
    path = write_yaml(tmp_path, base={}, engine="deepspeed", **oom_sections([2]))
    out = launch([["-opt", path]], tmp_path, nproc=None, check=False)
    assert out.returncode == 6
    assert "error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB" in out.stderr
    assert not (tmp_path / "toy" / "training_state").exists()
