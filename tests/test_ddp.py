"""DDP on CPU (2 gloo processes under torchrun): the same weights as one process with the same
global batch, exact resume, gradient accumulation, rank-averaged logs, rank-0-only writes."""

import pytest
import torch

from helpers import NITER, SECTIONS, launch, logged, make_trainer, weights, write_yaml

pytestmark = pytest.mark.slow  # torchrun launches


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process launch: a straight run, a run killed at step 6 and resumed (from its
    step-4 checkpoint), and a run with gradient accumulation; plus the 1-process reference."""
    root = tmp_path_factory.mktemp("ddp")
    straight = write_yaml(root / "straight")
    killed = write_yaml(root / "resumed")
    accum = write_yaml(root / "accum", train={"mega_batch_factor": 2})
    launch(
        [
            ["-opt", straight],
            {"argv": ["-opt", killed], "kill_at": 6},
            ["-opt", killed, "-o", "path.resume_state=auto"],
            ["-opt", accum],
        ],
        root,
        nproc=2,
    )
    make_trainer(root / "single", **SECTIONS).train()
    return root


def test_ddp_matches_one_process_with_the_same_global_batch(runs):
    ddp, single = weights(runs / "straight", NITER), weights(runs / "single", NITER)
    assert ddp.keys() == single.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    # the weights moved: equality is not just two untouched initialisations
    first = weights(runs / "straight", 4)
    assert any(not torch.equal(first[k], ddp[k]) for k in ddp)


def test_ddp_logs_are_averaged_over_ranks_and_written_once(runs):
    ddp, single = logged(runs / "straight", "loss/mse"), logged(runs / "single", "loss/mse")
    assert len(ddp) == len(single) == NITER  # one writer: no duplicated points
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-4, atol=1e-6)
    val_ddp, val_single = logged(runs / "straight", "val/mse"), logged(runs / "single", "val/mse")
    assert len(val_ddp) == 2  # each rank validated on half of datasets.val
    torch.testing.assert_close(
        torch.tensor(val_ddp), torch.tensor(val_single), rtol=1e-4, atol=1e-6
    )
    assert len(list((runs / "straight" / "toy" / "tb_logger").iterdir())) == 1
    state = torch.load(
        runs / "straight" / "toy" / "training_state" / f"{NITER}.state", weights_only=True
    )
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # each rank's share is half the global batch: the sampler stepped the same as one process
    assert state["loader"] == {"epoch": 1, "batches_done": 3}


def test_ddp_resume_matches_uninterrupted_run(runs):
    resumed, straight = weights(runs / "resumed", NITER), weights(runs / "straight", NITER)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)
    assert logged(runs / "resumed", "loss/mse")[-4:] == logged(runs / "straight", "loss/mse")[-4:]


def test_ddp_gradient_accumulation_matches(runs):
    accum, single = weights(runs / "accum", NITER), weights(runs / "single", NITER)
    for k in single:
        torch.testing.assert_close(accum[k], single[k], rtol=1e-5, atol=1e-6, msg=k)


def test_global_batch_must_divide_by_world_size(tmp_path):
    bad = write_yaml(tmp_path, datasets={"train": {"batch_size": 7}})
    with pytest.raises(
        AssertionError,
        match="batch_size: 7 is the global batch and must be divisible by the 2 ranks",
    ):
        launch([["-opt", bad]], tmp_path, nproc=2)


def test_a_mistake_under_torchrun_is_reported_once_and_is_the_root_cause(tmp_path):
    bad = write_yaml(tmp_path, train={"niter": 5, "warmup_iter": 10})
    out = launch([["-opt", bad]], tmp_path, nproc=2, check=False)
    assert out.returncode != 0
    message = "train.warmup_iter: is 10, not fewer than train.niter (5)"
    # Printed by rank 0 only, never by the other ranks (torchrun's summary lines indent). When
    # another rank exits first, torchrun may stop rank 0 before it prints: the summary's root
    # cause still carries the message, since every rank leaves it for torchrun.
    lines = out.stderr.splitlines()
    assert [line for line in lines if line.startswith("error: ")] in (
        [],
        [f"error: 1 problem in {bad}:"],
    )
    assert sum(line.startswith(f"  - {message}") for line in lines) <= 1
    summary = out.stderr[out.stderr.index("Root Cause") :]
    assert "error: 1 problem in" in summary and message in summary
    # the one traceback is torchrun's own ChildFailedError; none comes from the ranks
    assert out.stderr.count("Traceback (most recent call last)") == 1
