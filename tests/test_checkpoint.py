"""Tests for trainer.checkpoint.CheckpointManager."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoint import CheckpointManager
from utils.errors import CheckpointError
from utils.io import load_module, read_network_metadata


def _networks(dim: int = 3) -> dict[str, tuple[nn.Module, str, dict]]:
    return {
        "gen": (nn.Linear(dim, dim), "linear", {"dim": dim}),
        "disc": (nn.Linear(dim, 1), "linear_head", {"dim": dim}),
    }


def _save(mgr: CheckpointManager, step: int, ema: bool = False) -> Path:
    nets = _networks()
    emas = {"gen": nn.Linear(3, 3)} if ema else None
    return mgr.save(step, nets, {"iter": step, "opt": {"lr": torch.tensor(0.1)}}, ema=emas)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_save_writes_networks_ema_and_state(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    nets = _networks()
    ema = {"gen": nn.Linear(3, 3)}
    state_path = mgr.save(10, nets, {"iter": 10}, ema=ema)

    assert state_path == tmp_path / "training_state" / "10.state"
    assert _files(tmp_path / "models") == [
        "10_disc.safetensors",
        "10_gen.safetensors",
        "10_gen_ema.safetensors",
    ]
    state = mgr.load_state(state_path)
    assert state["iter"] == 10 and state["step"] == 10 and state["format_version"] == 2

    meta = read_network_metadata(mgr.network_path(10, "gen"))
    assert meta["which_model"] == "linear" and meta["kwargs"] == {"dim": 3}
    assert meta["step"] == "10" and meta["network"] == "gen"
    ema_meta = read_network_metadata(mgr.network_path(10, "gen", ema=True))
    assert ema_meta["which_model"] == "linear" and ema_meta["ema"] == "true"

    restored = nn.Linear(3, 3)
    assert load_module(restored, mgr.network_path(10, "gen", ema=True)).ok
    assert torch.equal(restored.weight, ema["gen"].weight)
    assert mgr.steps() == [10]


def test_save_rejects_ema_without_network(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="ghost"):
        mgr.save(1, _networks(), {}, ema={"ghost": nn.Linear(1, 1)})


def test_save_rejects_state_weights_only_cannot_load(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="10.state"):
        mgr.save(10, _networks(), {"bad": object()})
    assert mgr.steps() == []


def test_keep_last_prunes_old_steps(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    # an orphaned model file from an interrupted save, older than anything kept
    (tmp_path / "models").mkdir(parents=True)
    (tmp_path / "models" / "5_gen.safetensors").write_bytes(b"partial")
    for step in (100, 200, 300, 400):
        _save(mgr, step, ema=True)

    assert mgr.steps() == [300, 400]
    assert _files(tmp_path / "training_state") == ["300.state", "400.state"]
    assert _files(tmp_path / "models") == sorted(
        f"{s}_{n}.safetensors" for s in (300, 400) for n in ("disc", "gen", "gen_ema")
    )


def test_keep_last_never_deletes_the_step_just_saved(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 500)
    _save(mgr, 300)  # e.g. resumed from an older checkpoint
    assert 300 in mgr.steps()
    assert mgr.network_path(300, "gen").exists()


def test_keep_last_prunes_engine_folders(tmp_path: Path) -> None:
    """An engine's own folder (DeepSpeed's shards) goes with its step, also an orphan one
    left by a save that died before its state file."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        folder = mgr.engine_dir(step, "deepspeed")
        assert folder == tmp_path / "training_state" / f"{step}.deepspeed"
        (folder / "net").mkdir(parents=True)
        (folder / "net" / "shard.pt").write_bytes(b"x")
        if step != 2:  # step 2 "died" before its state file
            _save(mgr, step)
    assert _files(tmp_path / "training_state") == ["3.deepspeed", "3.state"]
    assert mgr.steps() == [3]


def test_keep_last_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_latest_returns_newest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() is None
    for step in (9, 10, 100):  # numeric, not lexical, order
        _save(mgr, step)
    assert mgr.latest() == mgr.state_path(100)
    assert mgr.steps() == [9, 10, 100]


def test_latest_skips_corrupt_and_ignores_temp_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 10)
    _save(mgr, 20)
    state_dir = tmp_path / "training_state"
    (state_dir / "30.state").write_bytes(b"\x00garbage, not a torch file\xff")
    (state_dir / ".40.state.tmp-1234").write_bytes(b"half written")
    (state_dir / "notes.state").write_bytes(b"x")
    (state_dir / "50.state.bak").write_bytes(b"x")

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert mgr.resolve_resume("auto") == mgr.state_path(20)
    assert "30.state" in caplog.text
    assert mgr.steps() == [10, 20, 30]


def test_load_state_rejects_foreign_file(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = tmp_path / "foreign.state"
    torch.save({"hello": 1}, path)
    with pytest.raises(CheckpointError, match="foreign.state"):
        mgr.load_state(path)
    torch.save({"format_version": 99}, path)
    with pytest.raises(CheckpointError, match="version"):
        mgr.load_state(path)


def test_resolve_resume(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    assert mgr.resolve_resume(None) is None
    assert mgr.resolve_resume("auto") is None  # no checkpoint yet: fresh start
    _save(mgr, 10)
    _save(mgr, 20)
    assert mgr.resolve_resume("auto") == mgr.state_path(20)
    assert mgr.resolve_resume(str(mgr.state_path(10))) == mgr.state_path(10)
    assert mgr.resolve_resume(mgr.state_path(10)) == mgr.state_path(10)

    with pytest.raises(CheckpointError) as info:
        mgr.resolve_resume(tmp_path / "training_state" / "999.state")
    message = str(info.value)
    assert "999.state" in message
    assert "10.state" in message and "20.state" in message


# --------------------------------------------------------------------------- integrity


def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_state_records_checksums_of_every_file(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 10, ema=True)
    engine = mgr.engine_dir(10, "deepspeed")
    engine.mkdir()
    (engine / "shard.pt").write_bytes(b"engine bytes")
    _save(mgr, 20)  # step 10's engine folder appeared after it was saved: not listed
    files = mgr.load_state(mgr.state_path(10))["files"]
    assert sorted(files) == [
        "models/10_disc.safetensors",
        "models/10_gen.safetensors",
        "models/10_gen_ema.safetensors",
    ]
    engine20 = mgr.engine_dir(30, "deepspeed")
    engine20.mkdir()
    (engine20 / "shard.pt").write_bytes(b"engine bytes")
    _save(mgr, 30)
    assert "training_state/30.deepspeed/shard.pt" in mgr.load_state(mgr.state_path(30))["files"]
    (engine20 / "shard.pt").write_bytes(b"engine bytez")
    with pytest.raises(CheckpointError, match="shard.pt is corrupt"):
        mgr.verify(mgr.state_path(30))


def test_auto_skips_checkpoint_with_corrupt_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 10)
    _save(mgr, 20)
    _flip(mgr.network_path(20, "gen"))  # one flipped exponent bit in a weight
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert mgr.resolve_resume("auto") == mgr.state_path(10)
    assert "skipping" in caplog.text and "20_gen.safetensors is corrupt" in caplog.text


def test_auto_skips_truncated_and_missing_files(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    for step in (10, 20, 30):
        _save(mgr, step)
    path = mgr.network_path(30, "disc")
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    mgr.network_path(20, "gen").unlink()  # missing
    path, state, skipped = mgr.newest_intact()
    assert path == mgr.state_path(10) and state["step"] == 10
    reasons = "\n".join(why for _, why in skipped)
    assert (
        "30_disc.safetensors is corrupt" in reasons and "20_gen.safetensors is missing" in reasons
    )


def test_corrupt_state_file_is_caught(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 10)
    path = mgr.state_path(10)
    data = bytearray(path.read_bytes())
    at = data.find(torch.tensor(0.1).numpy().tobytes())  # the stored lr tensor's bytes
    assert at > 0
    data[at + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="10.state is corrupt"):
        mgr.load_state(path)


def test_auto_refuses_when_no_checkpoint_is_intact(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 10)
    _save(mgr, 20)
    _flip(mgr.network_path(10, "gen"))
    mgr.state_path(20).write_bytes(b"not a state")
    with pytest.raises(CheckpointError) as info:
        mgr.resolve_resume("auto")
    msg = str(info.value)
    assert "none of the 2 checkpoint(s)" in msg and "Refusing to start over" in msg
    assert "10_gen.safetensors is corrupt" in msg and "20.state" in msg
    assert "path.resume_state: null" in msg and "`name`" in msg


def test_explicit_resume_of_damaged_checkpoint_names_an_intact_one(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 10)
    _save(mgr, 20)
    _flip(mgr.network_path(20, "disc"))
    with pytest.raises(CheckpointError) as info:
        mgr.resolve_resume(mgr.state_path(20))
    assert "20_disc.safetensors is corrupt" in str(info.value)
    assert f"newest intact checkpoint is {mgr.state_path(10)}" in str(info.value)


def test_a_step_protected_twice_stays_until_both_release_it(tmp_path: Path) -> None:
    """The best checkpoint may also be the last good one before a non-finite streak: the
    streak ending must not release the best."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 1)
    mgr.protect(1, "best")
    mgr.protect(1, "streak")
    _save(mgr, 2)
    mgr.unprotect(1, "streak")
    _save(mgr, 3)
    assert mgr.steps() == [1, 3]
    mgr.unprotect(1, "best")
    _save(mgr, 4)
    assert mgr.steps() == [4] and not mgr.network_path(1, "gen").exists()
