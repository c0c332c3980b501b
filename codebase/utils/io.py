"""Crash-safe file writing and (de)serialisation of networks and training state.

Networks go to safetensors (no pickle, loadable anywhere); training state goes through
``torch.save`` and is read back with ``weights_only=True`` so a checkpoint can never run code.
Every write is atomic: a kill mid-save leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from utils.errors import CheckpointError

NETWORK_FORMAT = "codec-tts-network"
NETWORK_FORMAT_VERSION = "1"
# LoRA adapters of a network (models/lora.py): only the adapter tensors, the base named in the
# metadata. Named here so that reading one as a network says what it is.
ADAPTER_FORMAT = "codec-tts-lora"
_RESERVED_METADATA = ("format", "format_version", "which_model", "kwargs", "sha256")
DIGEST_KEY = "sha256"  # safetensors metadata key / state dict key holding a content checksum
_MAX_LISTED_KEYS = 20


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` via ``write(tmp)`` on a sibling temp file, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target so os.replace is a rename within one filesystem (atomic);
    # the leading dot and pid keep it out of globs and apart from other processes' writes.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        if not tmp.exists():
            raise RuntimeError(f"the writer for {path} did not create the temporary file {tmp}")
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException too: a Ctrl-C mid-write must not leave temp files behind.
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(tmp):
            e.filename = str(path)  # name the file the user knows, not the temporary one
        raise
    # Persist the rename itself; without this a power loss can revert the directory entry.
    _fsync_dir(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms/filesystems cannot open directories; the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- shared tensors


def _alias_key(t: torch.Tensor) -> tuple | None:
    # Only exact views (same memory, layout and dtype) count as the same tensor; tensors that
    # merely share a storage are handled by cloning at save time instead.
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _duplicate_names(
    state_dict: dict[str, torch.Tensor], preferred: Iterable[str] = ()
) -> dict[str, str]:
    """Map each duplicate name of a tied tensor to the one name kept for it.

    Like safetensors' ``save_model``/``load_model`` the kept name is the first in sorted order,
    unless some names are ``preferred`` (those present in the file being loaded), so a file
    saved under either name of a tied pair still loads.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in state_dict.items():
        key = _alias_key(tensor)
        if key is not None:
            groups[key].append(name)
    preferred = set(preferred)
    duplicates: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        names = sorted(names)
        keep = next((n for n in names if n in preferred), names[0])
        duplicates.update({n: keep for n in names if n != keep})
    return duplicates


def _tensors_for_saving(module: nn.Module) -> dict[str, torch.Tensor]:
    state_dict = module.state_dict()
    for name in _duplicate_names(state_dict):
        del state_dict[name]
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        storage_id = (storage.data_ptr(), storage.nbytes())
        # safetensors refuses tensors that share memory or cover only part of their storage
        # (it would silently store the whole storage); a private copy avoids both.
        partial = storage.nbytes() != t.numel() * t.element_size()
        if partial or (t.numel() and storage_id in seen_storages):
            t = t.clone()
            storage_id = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen_storages.add(storage_id)
        tensors[name] = t
    return tensors


# --------------------------------------------------------------------------- checksums


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` into hash ``h`` in a canonical order: the same content, the same digest."""
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}|".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for value in obj:
            _feed(h, value)
    else:  # str, bytes, int, float, bool, None: repr is exact and round-trips
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def content_digest(obj: Any) -> str:
    """SHA-256 of nested dicts/lists of tensors and plain values, independent of file layout
    (tensor bytes, dtypes, shapes, keys); stored when a file is written, checked on load."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def corrupt_file_error(path: Path, what: str = "its contents") -> CheckpointError:
    """The error for a file whose checksum no longer matches what was recorded at save."""
    return CheckpointError(
        f"{path} is corrupt: {what} no longer match the checksum recorded when it was "
        f"written (damaged on disk or in a copy); use another checkpoint (an older step) or "
        f"copy the file again from a good source"
    )


# --------------------------------------------------------------------------- saving


def save_module(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``module``'s state dict to a safetensors file; tied tensors are stored once."""
    path = Path(path)
    metadata = dict(metadata or {})
    bad = {
        k: type(v).__name__
        for k, v in metadata.items()
        if not isinstance(k, str) or not isinstance(v, str)
    }
    if bad:
        raise TypeError(
            f"metadata for {path} must map str to str; convert these entries to strings: {bad}"
        )
    save_tensors(_tensors_for_saving(module), path, metadata)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Save CPU tensors (each with its own storage) to a safetensors file, atomically, with a
    checksum of their contents in the metadata (verified by :func:`read_safetensors`)."""
    metadata = dict(metadata or {})
    metadata[DIGEST_KEY] = content_digest(tensors)
    atomic_write(Path(path), lambda tmp: _save_file(tensors, tmp, metadata))


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, with its I/O failures raised as the OSError they are (a
    full disk is ``ENOSPC``, not a serialisation error)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        errno_ = int(code.group(1))
        raise OSError(errno_, os.strerror(errno_), str(path)) from e


def save_network(
    module: nn.Module,
    path: Path,
    *,
    which_model: str,
    kwargs: dict,
    extra: dict[str, str] | None = None,
) -> None:
    """Save a network together with the registry name and kwargs needed to rebuild it."""
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except TypeError as e:
        raise TypeError(
            f"cannot save {path}: the kwargs of network '{which_model}' must be JSON-serialisable "
            f"so the file can rebuild it without a YAML ({e}); pass plain numbers, strings, lists "
            f"and dicts"
        ) from e
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED_METADATA))
    if clash:
        raise ValueError(
            f"cannot save {path}: extra metadata may not override the reserved keys {clash}; "
            f"rename those entries"
        )
    metadata = {
        "format": NETWORK_FORMAT,
        "format_version": NETWORK_FORMAT_VERSION,
        "which_model": which_model,
        "kwargs": kwargs_json,
        **extra,
    }
    save_module(module, path, metadata)


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; a missing or unreadable file raises with what to do."""
    if not path.is_file():
        raise CheckpointError(f"network file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt, "
        f"re-save it or point to another checkpoint"
    )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, verified against its stored checksum
    (files written before checksums existed, or by other tools, have none to verify)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from e
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and content_digest(tensors) != expected:
        raise corrupt_file_error(path, "its weights")
    return tensors, metadata


def verify_safetensors(path: Path) -> None:
    """Raise :class:`CheckpointError` if ``path`` is unreadable or fails its checksum."""
    read_safetensors(path)


def read_network_metadata(path: Path) -> dict[str, Any]:
    """Return ``{"which_model": str, "kwargs": dict, **other metadata}`` of a saved network."""
    path = Path(path)
    meta = safetensors_metadata(path)
    if meta.get("format") == ADAPTER_FORMAT:
        raise CheckpointError(
            f"{path} holds LoRA adapters, not a whole network; merge them into their base "
            f"first (python -m models.lora merge --lora {path} --out merged.safetensors), or "
            f"give the base as the model and this file as --lora"
        )
    if meta.get("format") != NETWORK_FORMAT or "which_model" not in meta or "kwargs" not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file but not a network written by save_network (no "
            f"'{NETWORK_FORMAT}' metadata), so its model class is unknown; build the model from "
            f"the experiment YAML and load the weights with load_module instead"
        )
    if meta.get("format_version") != NETWORK_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has network format version {meta.get('format_version')!r}, this code reads "
            f"version {NETWORK_FORMAT_VERSION}; use the code version that wrote it"
        )
    try:
        kwargs = json.loads(meta["kwargs"])
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} has corrupt 'kwargs' metadata ({e}); re-save the network"
        ) from e
    return {**meta, "which_model": meta["which_model"], "kwargs": kwargs}


# --------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What did not line up between a checkpoint file and the module it was loaded into."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)  # rows added by ``load_module(grow=True)``

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int | None = None) -> str:
        """Readable multi-line summary; ``limit`` truncates each list."""
        if self.ok:
            return "all keys matched"
        sections = [
            ("missing (in the model, not in the checkpoint)", self.missing),
            ("unexpected (in the checkpoint, not in the model)", self.unexpected),
            ("shape mismatch (not loaded)", self.mismatched),
        ]
        lines: list[str] = []
        for title, keys in sections:
            if keys:
                lines.append(f"{title}: {len(keys)}")
                lines.extend(f"  - {k}" for k in _truncate(keys, limit))
        return "\n".join(lines)


def _truncate(keys: list[str], limit: int | None) -> list[str]:
    if limit is None or len(keys) <= limit:
        return list(keys)
    return list(keys[:limit]) + [f"... and {len(keys) - limit} more"]


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors (checksum verified), or a torch pickle
    (``.pth`` ...; loaded with ``weights_only=True``, so it cannot run code) holding a state
    dict, possibly wrapped as ``{"state_dict": ...}`` / ``{"model": ...}`` and with the
    ``module.`` prefix DataParallel/DDP leave on every key."""
    path = Path(path)
    if path.suffix not in TORCH_SUFFIXES:
        return read_safetensors(path)[0]
    obj = load_torch(path)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} does not hold a state dict (a dict of tensors, possibly under "
            f"'state_dict'); point to a weights file"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def weight_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The names and shapes of a weights file's tensors, as meta tensors (no data): read from
    a safetensors header, or from a torch pickle mapped lazily. For checking a file against a
    network (:func:`compare_weights`) without loading it."""
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        return {k: torch.empty(v.shape, device="meta") for k, v in read_weights(path).items()}
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                for k in f.keys()  # noqa: SIM118 - safe_open has no __iter__
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from e


def adapted(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` through the module's ``adapt_checkpoint`` hook, if it has one: a network
    reads older files of its kind this way (e.g. drops buffers a library no longer keeps)."""
    adapt = getattr(module, "adapt_checkpoint", None)
    return adapt(state) if callable(adapt) else state


def compare_weights(module: nn.Module, loaded: dict[str, torch.Tensor]) -> LoadReport:
    """What does not line up between ``module``'s state dict and a file's (adapted) tensors.
    Works for a module on the meta device and for :func:`weight_shapes`' meta tensors."""
    model_sd = module.state_dict()
    # A tied tensor is stored under one name; its other names are filled through the tie.
    duplicates = _duplicate_names(model_sd, preferred=loaded.keys())
    report = LoadReport()
    for name in model_sd:  # model order reads better than sorted ("2" before "10")
        if name in loaded:
            continue
        if name in duplicates and duplicates[name] in loaded:
            continue
        report.missing.append(name)
    report.unexpected = sorted(k for k in loaded if k not in model_sd)
    for name, tensor in model_sd.items():
        if name not in loaded:
            continue
        have, want = tuple(loaded[name].shape), tuple(tensor.shape)
        if have != want:
            report.mismatched.append(
                f"{name}: checkpoint shape {list(have)} vs model shape {list(want)}"
            )
    return report


def grow_rows(
    module: nn.Module, loaded: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``loaded`` with every tensor that has fewer rows than the module's (dim 0; the other
    dims equal) grown to the module's size: a grown vocabulary or codebook. The old rows are
    kept (so every old id embeds and scores as before) and each new row is the mean of the old
    ones. Returns the tensors and a ``name: [old] -> [new]`` line per grown tensor. Works on
    meta tensors (:func:`weight_shapes`) too."""
    own = module.state_dict()
    out, grown = dict(loaded), []
    for name, tensor in loaded.items():
        target = own.get(name)
        if target is None or tensor.dim() == 0 or tensor.dim() != target.dim():
            continue
        rows, want = tensor.shape[0], target.shape[0]
        if want <= rows or tensor.shape[1:] != target.shape[1:]:
            continue
        bigger = tensor.new_empty(target.shape)
        bigger[:rows] = tensor
        bigger[rows:] = tensor.float().mean(dim=0).to(tensor.dtype)
        out[name] = bigger
        grown.append(f"{name}: {list(tensor.shape)} -> {list(target.shape)}")
    return out, grown


def load_module(
    module: nn.Module, path: Path, strict: bool = True, grow: bool = False
) -> LoadReport:
    """Load a weights file (see :func:`read_weights`) into ``module``; mismatched shapes are
    reported and skipped.

    With ``strict`` any mismatch raises before the module is touched; otherwise whatever
    matches is loaded and the report says what did not. The file's tensors go through the
    module's ``adapt_checkpoint`` (see :func:`adapted`) before they are compared. With
    ``grow``, tensors with fewer rows than the module's are grown first (:func:`grow_rows`;
    listed in the report's ``grown``).
    """
    path = Path(path)
    loaded = adapted(module, read_weights(path))
    grown: list[str] = []
    if grow:
        loaded, grown = grow_rows(module, loaded)
    report = compare_weights(module, loaded)
    report.grown = grown
    if strict and not report.ok:
        raise CheckpointError(
            f"checkpoint {path} does not match {type(module).__name__}:\n"
            f"{report.describe(limit=_MAX_LISTED_KEYS)}\n"
            f"Fix the model options to match the checkpoint, or set `path.strict_load: false` "
            f"to load the matching keys anyway."
        )
    skip = set(report.unexpected) | {m.split(": ", 1)[0] for m in report.mismatched}
    usable = {k: v for k, v in loaded.items() if k not in skip}
    module.load_state_dict(usable, strict=False)
    return report


# --------------------------------------------------------------------------- torch pickles


def save_torch(obj: Any, path: Path, *, verify: bool = False) -> None:
    """Atomic ``torch.save``; ``verify`` re-reads it with ``weights_only`` before committing."""
    path = Path(path)

    def write(tmp: Path) -> None:
        torch.save(obj, tmp)
        if verify:
            # Catch objects weights_only loading refuses now, not when resuming days later.
            try:
                torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(
                    f"refusing to write {path}: it could not be read back with weights_only=True "
                    f"({e}); store only tensors, numbers, strings and lists/tuples/dicts of them "
                    f"(e.g. call .state_dict() instead of saving objects)"
                ) from e

    atomic_write(path, write)


def load_torch(path: Path) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be loaded ({type(e).__name__}: {e}); it may be truncated or "
            f"corrupt, or hold objects weights_only loading refuses; use another checkpoint"
        ) from e
