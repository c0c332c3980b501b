"""Tests for utils.io (safetensors networks, atomic writes, torch pickles) and utils.seed."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from utils.errors import CheckpointError
from utils.io import (
    LoadReport,
    atomic_write,
    content_digest,
    load_module,
    load_torch,
    read_network_metadata,
    save_module,
    save_network,
    save_torch,
)
from utils.seed import rng_state, set_rng_state, set_seed


class Tiny(nn.Module):
    def __init__(self, dim: int = 4, extra: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.arange(dim, dtype=torch.float32))
        if extra:
            self.extra = nn.Linear(dim, 2)


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight, as in a language model."""

    def __init__(self, vocab: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src, dst = Tiny(), Tiny()
    path = tmp_path / "sub" / "tiny.safetensors"
    save_module(src, path)
    report = load_module(dst, path)
    assert report.ok and report == LoadReport()
    _assert_same_state(src, dst)


def test_tied_weights_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src, dst = TiedLM(), TiedLM()
    path = tmp_path / "tied.safetensors"
    save_module(src, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys) == 1  # the tied weight is stored once
    report = load_module(dst, path)
    assert report.ok, report.describe()
    _assert_same_state(src, dst)
    assert dst.head.weight is dst.emb.weight  # still tied after loading


def test_tied_file_into_untied_model_reports_missing(tmp_path: Path) -> None:
    path = tmp_path / "tied.safetensors"
    save_module(TiedLM(), path)
    untied = TiedLM()
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    report = load_module(untied, path, strict=False)
    assert report.missing == ["head.weight"]


def test_noncontiguous_and_shared_storage_tensors(tmp_path: Path) -> None:
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.arange(12.0).reshape(3, 4)
            self.register_buffer("t", base.t())  # non-contiguous
            self.register_buffer("top", base[:1])  # covers part of a storage
            self.register_buffer("other", base[1:])  # shares that storage

    src = Views()
    path = tmp_path / "views.safetensors"
    save_module(src, path)
    dst = Views()
    for b in dst.buffers():
        b.zero_()
    assert load_module(dst, path).ok
    _assert_same_state(src, dst)


def test_network_metadata_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    kwargs = {"dim": 4, "layers": [1, 2], "name": "x"}
    save_network(Tiny(), path, which_model="tiny", kwargs=kwargs, extra={"step": "7"})
    meta = read_network_metadata(path)
    assert meta["which_model"] == "tiny"
    assert meta["kwargs"] == kwargs
    assert meta["step"] == "7"
    assert meta["format"] == "codec-tts-network"


def test_read_network_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        read_network_metadata(tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_module(Tiny(), plain)
    with pytest.raises(CheckpointError, match="plain.safetensors"):
        read_network_metadata(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_network_metadata(garbage)


def test_save_network_rejects_unserialisable_kwargs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        save_network(Tiny(), tmp_path / "n.safetensors", which_model="tiny", kwargs={"f": object()})


def test_strict_load_names_missing_key_and_option(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_module(Tiny(), path)
    bigger = Tiny(extra=True)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_module(bigger, path)
    message = str(info.value)
    assert "extra.weight" in message and "extra.bias" in message
    assert "path.strict_load" in message
    assert str(path) in message
    # strict failure must not have modified the module
    for k, v in bigger.state_dict().items():
        assert torch.equal(v, before[k])


def test_non_strict_load_returns_report_and_loads_matches(tmp_path: Path) -> None:
    src = Tiny(extra=True)
    path = tmp_path / "big.safetensors"
    save_module(src, path)
    dst = Tiny()
    report = load_module(dst, path, strict=False)
    assert not report.ok
    assert report.unexpected == ["extra.bias", "extra.weight"]
    assert report.missing == [] and report.mismatched == []
    assert torch.equal(dst.lin.weight, src.lin.weight)
    assert "extra.weight" in report.describe()


def test_shape_mismatch_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "dim4.safetensors"
    save_module(Tiny(dim=4), path)
    dst = Tiny(dim=3)
    before = dst.lin.weight.detach().clone()
    report = load_module(dst, path, strict=False)
    assert "lin.weight: checkpoint shape [4, 4] vs model shape [3, 3]" in report.mismatched
    assert len(report.mismatched) == 3
    assert torch.equal(dst.lin.weight, before)
    with pytest.raises(CheckpointError, match="lin.weight: checkpoint shape"):
        load_module(dst, path)


def test_strict_error_truncates_long_key_lists(tmp_path: Path) -> None:
    path = tmp_path / "one.safetensors"
    save_module(nn.Linear(1, 1), path)
    many = nn.Sequential(*[nn.Linear(1, 1) for _ in range(30)])
    with pytest.raises(CheckpointError, match=r"and \d+ more"):
        load_module(many, path)


def test_load_module_missing_and_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent.safetensors"):
        load_module(Tiny(), tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_module(Tiny(), bad)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"old contents")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_atomic_write_replaces_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "data.bin"
    seen: list[Path] = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"new")

    atomic_write(path, writer)
    assert path.read_bytes() == b"new"
    assert seen[0].parent == path.parent and seen[0].name == f".data.bin.tmp-{os.getpid()}"
    assert not seen[0].exists()


def test_save_load_torch(tmp_path: Path) -> None:
    obj = {"a": torch.arange(3), "b": [1, 2.5, "x"], "c": {"d": (1, 2)}}
    path = tmp_path / "obj.pt"
    save_torch(obj, path)
    back = load_torch(path)
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"] and back["c"] == obj["c"]
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_torch(tmp_path / "missing.pt")


class Custom:
    """A picklable object that weights_only loading refuses."""


def test_save_torch_verify_rejects_unloadable_objects(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    with pytest.raises(ValueError, match="weights_only"):
        save_torch({"obj": Custom()}, path, verify=True)
    assert not path.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- seed


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist(),
    )


def test_rng_state_restore() -> None:
    set_seed(123)
    _draw()
    state = rng_state()
    first = _draw()
    set_rng_state(state)
    assert _draw() == first


def test_rng_state_roundtrip_through_save_torch(tmp_path: Path) -> None:
    set_seed(5)
    random.gauss(0, 1)  # leave a cached gaussian in python's state
    np.random.randn()
    state = rng_state()
    path = tmp_path / "rng.state"
    save_torch(state, path, verify=True)
    first = _draw()
    set_seed(999)
    set_rng_state(load_torch(path))
    assert _draw() == first


def test_set_seed_is_deterministic() -> None:
    set_seed(7)
    a = _draw()
    set_seed(7)
    assert _draw() == a
    with pytest.raises(ValueError, match="seed"):
        set_seed(-1)


# --------------------------------------------------------------------------- checksums


def flip_bit(path: Path, offset: int = -1, mask: int = 0x40) -> None:
    """Flip one bit of a file in place (by default an exponent bit of its last float)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_flipped_weight_bit_is_caught_on_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_network(Tiny(), path, which_model="tiny", kwargs={})
    flip_bit(path)
    read_network_metadata(path)  # the header is intact: only the weights changed
    with pytest.raises(CheckpointError, match="tiny.safetensors is corrupt"):
        load_module(Tiny(), path)


def test_file_without_checksum_still_loads(tmp_path: Path) -> None:
    """Files from other tools (or written before checksums) have nothing to verify."""
    from safetensors.torch import save_file

    src, dst = Tiny(), Tiny()
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert load_module(dst, path).ok
    _assert_same_state(src, dst)


def test_content_digest_depends_on_content_not_order() -> None:
    a = {"x": torch.arange(4.0), "y": [1, 2.5, "s", None], "z": {"k": torch.zeros(2)}}
    b = {"z": {"k": torch.zeros(2)}, "y": [1, 2.5, "s", None], "x": torch.arange(4.0)}
    assert content_digest(a) == content_digest(b)
    for changed in (
        {**a, "x": torch.arange(4.0).to(torch.float64)},  # same values, another dtype
        {**a, "x": torch.arange(4.0).reshape(2, 2)},  # another shape
        {**a, "y": [1, 2.5, "s"]},
        {**a, "y": (1, 2.5, "s", None)},
    ):
        assert content_digest(changed) != content_digest(a)
    bad = {**a, "x": torch.tensor([0.0, 1.0, 2.0, 3.0000002])}
    assert content_digest(bad) != content_digest(a)


# --------------------------------------------------------------------------- torch files


def test_pth_state_dicts_load_unwrapped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = Tiny()
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    torch.save(src.state_dict(), plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        dst = Tiny()
        assert load_module(dst, path).ok
        _assert_same_state(src, dst)
    torch.save({"step": 3}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_module(Tiny(), tmp_path / "other.pth")


class Legacy(Tiny):
    def adapt_checkpoint(self, state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.endswith(".old_buffer")}


def test_a_module_adapts_older_files_and_stays_strict(tmp_path: Path) -> None:
    src = Tiny()
    path = tmp_path / "old.pth"
    torch.save({**src.state_dict(), "lin.old_buffer": torch.zeros(1)}, path)
    assert load_module(Legacy(), path).ok
    with pytest.raises(CheckpointError, match="lin.old_buffer"):
        load_module(Tiny(), path)  # no adapter: the extra key is an error
    torch.save({**src.state_dict(), "lin.other": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="lin.other"):
        load_module(Legacy(), path)  # the adapter drops only what it knows
