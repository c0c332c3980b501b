"""LoRA: low-rank adapters on the linear projections of any registered network.

An adapted projection computes ``base(x) + scale * B(A(dropout(x)))`` with ``A`` [r, in]
(Kaiming-uniform, as ``nn.Linear`` starts) and ``B`` [out, r] zero, so a fresh adapter changes
nothing; ``scale = alpha / r``. The base weights stay frozen; only ``A`` and ``B`` train, and an
adapter file holds only them plus the name and SHA-256 of the base file they were trained on.
:func:`merge_lora` folds them into the base (``W += scale * B @ A``), giving a plain network.

Why not peft: peft's LoRA wraps ``nn.Linear``, ``nn.Embedding``, ``nn.Conv*`` and
transformers' ``Conv1D``, but not our GPT-2 ``Conv1D`` (weight [in, out], the layout of
Tortoise's checkpoints); custom layers go through an experimental private hook
(``LoraConfig._register_custom_module``) that is not saved with the adapter, and would need
a ``LoraLayer`` subclass of our own anyway. ``pip install peft`` also pulls transformers and
accelerate (peft 0.21: transformers 5, accelerate 1.15), and its adapter format has no place
for our base-file digest. The part we need is this file.

    cd codebase && python -m models.lora merge --lora run/models/600_gpt_lora.safetensors \\
        --out merged.safetensors [--base other/place/base.safetensors]
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import build_network
from models.audio.tts.gpt2 import Conv1D
from utils.errors import CheckpointError, UserError, run_command
from utils.io import (
    ADAPTER_FORMAT,
    DIGEST_KEY,
    NETWORK_FORMAT_VERSION,
    file_sha256,
    load_module,
    read_safetensors,
    save_network,
    save_tensors,
)
from utils.options import add_debug_flag
from utils.schema import Fraction, PositiveFloat, PositiveInt

# What LoRA can adapt, and whether the class stores its weight [in, out] (GPT-2's Conv1D)
# rather than [out, in] (nn.Linear).
ADAPTABLE: dict[type, bool] = {nn.Linear: False, Conv1D: True}
# Metadata of an adapter file besides the network's own extras (step, codec, vocab ...).
_ADAPTER_KEYS = (
    "format",
    "format_version",
    "which_model",
    "kwargs",
    DIGEST_KEY,
    "lora",
    "base",
    "base_sha256",
    "pretrain",
)


@dataclass
class LoraOptions:
    """``networks.<name>.lora``: adapt the network's projections with rank-``rank`` updates."""

    rank: PositiveInt = 8  # r: each adapted [out, in] weight gains r * (in + out) parameters
    alpha: PositiveFloat = 16.0  # the update is scaled by alpha / rank (peft's lora_alpha)
    dropout: Fraction = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    # fnmatch patterns of module names (``named_modules``); null: the model's lora_targets
    target: list[str] | None = None


class LoraLayer(nn.Module):
    """A frozen projection (``base``: nn.Linear or GPT-2's Conv1D) plus a low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.transposed = ADAPTABLE[type(base)]
        w = base.weight
        n_out, n_in = w.shape[::-1] if self.transposed else w.shape
        self.lora_a = nn.Parameter(torch.empty(rank, n_in, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        # Identity at 0: no dropout call, so the random streams match a run without adapters
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # [..., out]
        return y + update * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` in the base weight's layout."""
        d = (self.lora_b @ self.lora_a) * self.scale  # [out, in]
        return d.T if self.transposed else d

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the base weight (forward then skips the adapter)."""
        if not self.merged:
            self.base.weight.add_(self.delta().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (up to rounding)."""
        if self.merged:
            self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale:g}, merged={self.merged}"


# ----------------------------------------------------------------------------- targets


def default_targets(net: nn.Module) -> list[str] | None:
    """The model family's ``lora_targets`` (its attention and MLP projections), if any."""
    targets = getattr(net, "lora_targets", None)
    return list(targets) if targets else None


def match_targets(net: nn.Module, patterns: list[str]) -> tuple[list[str], list[tuple[int, str]]]:
    """(names of the adaptable modules some pattern matches, [(pattern index, problem)] for
    each pattern that matches none of them)."""
    modules = [(n, m) for n, m in net.named_modules() if n]
    adaptable = [n for n, m in modules if type(m) in ADAPTABLE]
    chosen, problems = [], []
    for i, pattern in enumerate(patterns):
        hits = [n for n in adaptable if fnmatchcase(n, pattern)]
        chosen += [n for n in hits if n not in chosen]
        if hits:
            continue
        others = [f"{n} ({type(m).__name__})" for n, m in modules if fnmatchcase(n, pattern)]
        close = difflib.get_close_matches(pattern, adaptable, n=3, cutoff=0.0) or adaptable[:3]
        found = (
            f"matches only modules LoRA cannot adapt ({', '.join(others[:3])})"
            if others
            else "matches no module"
        )
        problems.append(
            (
                i,
                f"{pattern!r} {found}; LoRA adapts nn.Linear and GPT-2 Conv1D modules, e.g. "
                f"{', '.join(close) or '(this network has none)'} ({len(adaptable)} in all)",
            )
        )
    return chosen, problems


def apply_lora(net: nn.Module, options: LoraOptions) -> list[str]:
    """Wrap the modules ``options.target`` (or the model's defaults) selects in
    :class:`LoraLayer`; returns their names. Raises ValueError for a pattern matching none."""
    if any(isinstance(m, LoraLayer) for m in net.modules()):
        raise ValueError(f"{type(net).__name__} already has LoRA adapters")
    patterns = options.target or default_targets(net)
    if not patterns:
        raise ValueError(
            f"{type(net).__name__} has no default lora_targets; give lora.target patterns"
        )
    names, problems = match_targets(net, patterns)
    if problems:
        raise ValueError("; ".join(f"lora.target[{i}]: {msg}" for i, msg in problems))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, LoraLayer(base, options.rank, options.alpha, options.dropout))
    return names


def lora_layers(net: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer)}


def requires_grad_(net: nn.Module, on: bool) -> None:
    """``net.requires_grad_(on)``, except that a network with adapters trains only them."""
    layers = lora_layers(net)
    net.requires_grad_(on and not layers)
    for layer in layers.values():
        layer.lora_a.requires_grad_(on)
        layer.lora_b.requires_grad_(on)


def adapter_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by state-dict name (``<module>.lora_a`` / ``.lora_b``)."""
    out = {}
    for name, layer in lora_layers(net).items():
        out[f"{name}.lora_a"] = layer.lora_a
        out[f"{name}.lora_b"] = layer.lora_b
    return out


@torch.no_grad()
def load_adapter_state(net: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy an adapter file's tensors into ``net``'s adapters; every key and shape must match."""
    own = adapter_state(net)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: file {list(tensors[k].shape)} vs network {list(v.shape)}"
        for k, v in own.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        listing = [*(f"missing {k}" for k in missing), *(f"unexpected {k}" for k in unexpected)]
        raise CheckpointError(
            f"the adapters of {path} do not fit the network's ({'; '.join((listing + shapes)[:6])}"
            f"); make networks.<net>.lora (rank, target) match the file's: "
            f"{read_adapters(path).meta.get('lora')}"
        )
    for k, v in own.items():
        v.copy_(tensors[k])


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base module back in its place, so
    the network has its original parameter names (and speed); returns ``net``."""
    for name, layer in lora_layers(net).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, layer.base)
    return net


def parameter_counts(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied ones counted once."""
    params = list(net.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- files


@dataclass
class AdapterFile:
    """An adapter file's tensors and what its metadata says about them."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]  # every metadata entry, as stored
    which_model: str
    kwargs: dict
    options: LoraOptions
    base: Path  # the base network file, as recorded
    base_sha256: str

    @property
    def extra(self) -> dict[str, str]:
        """The network's own metadata (step, codec, vocabulary ...), for a merged file."""
        return {k: v for k, v in self.meta.items() if k not in _ADAPTER_KEYS}


def save_adapters(
    net: nn.Module,
    path: Path,
    *,
    which_model: str,
    kwargs: dict,
    options: LoraOptions,
    base: Path,
    base_sha256: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Write ``net``'s adapter tensors with the metadata that rebuilds the adapted network:
    the model's name and kwargs, the LoRA options and the base file with its SHA-256."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state(net).items()}
    metadata = {
        **(extra or {}),
        "format": ADAPTER_FORMAT,
        "format_version": NETWORK_FORMAT_VERSION,
        "which_model": which_model,
        "kwargs": json.dumps(kwargs, sort_keys=True),
        "lora": json.dumps(asdict(options)),
        "base": str(base),
        "base_sha256": base_sha256,
    }
    save_tensors(tensors, path, metadata)


def read_adapters(path: Path) -> AdapterFile:
    """Read (and verify the checksum of) an adapter file written by :func:`save_adapters`."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"{path} is not a LoRA adapter file (format {meta.get('format')!r}); give a "
            f"<step>_<net>_lora.safetensors file the trainer wrote"
        )
    try:
        options = LoraOptions(**json.loads(meta["lora"]))
        kwargs = json.loads(meta["kwargs"])
        which, base, sha = meta["which_model"], Path(meta["base"]), meta["base_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has corrupt LoRA metadata ({e}); re-save it") from e
    return AdapterFile(path, tensors, meta, which, kwargs, options, base, sha)


def find_base(adapters: AdapterFile, base: Path | None = None) -> Path:
    """The base network file of ``adapters``: ``base`` if given, else the recorded path, else
    a file of that name next to the adapter file (a run folder that moved). Its SHA-256 must
    be the one the adapters were trained on."""
    candidates = (
        [Path(base)] if base else [adapters.base, adapters.path.parent / adapters.base.name]
    )
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CheckpointError(
            f"the base network {candidates[0]} of {adapters.path} does not exist; restore it "
            f"(the adapters only make sense on the weights they were trained on) or name its "
            f"new place (--base)"
        )
    digest = file_sha256(found)
    if digest != adapters.base_sha256:
        raise CheckpointError(
            f"{found} is not the base the adapters of {adapters.path} were trained on: its "
            f"SHA-256 is {digest[:16]}..., the adapters' base had {adapters.base_sha256[:16]}... "
            f"(the file changed since, or it is another one). Restore the original base file; "
            f"to fine-tune the new one, start a new run from it (path.pretrain_model_<net>)"
        )
    return found


def load_adapted(
    lora: Path, base: Path | None = None, merge: bool = True
) -> tuple[nn.Module, AdapterFile]:
    """The network of an adapter file: built from its metadata, the base weights loaded (see
    :func:`find_base`), the adapters applied and, with ``merge``, folded in."""
    adapters = read_adapters(lora)
    base_path = find_base(adapters, base)
    net = build_network(adapters.which_model, adapters.kwargs)
    load_module(net, base_path, strict=True)
    apply_lora(net, adapters.options)
    load_adapter_state(net, adapters.tensors, adapters.path)
    return (merge_lora(net) if merge else net), adapters


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.lora",
        description="Merge LoRA adapters into their base network, giving a plain network file.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold an adapter file into its base")
    m.add_argument("--lora", required=True, type=Path, help="<run>/models/<step>_<net>_lora...")
    m.add_argument("--out", required=True, type=Path, help="the .safetensors network to write")
    m.add_argument(
        "--base", type=Path, help="the base network file (default: the one the adapters name)"
    )
    add_debug_flag(m)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.suffix != ".safetensors":
        raise UserError(f"--out {args.out}: name it *.safetensors (a network file is written)")
    net, adapters = load_adapted(args.lora, args.base)
    extra = {**adapters.extra, "merged_lora": str(args.lora)}
    save_network(
        net, args.out, which_model=adapters.which_model, kwargs=adapters.kwargs, extra=extra
    )
    n = len(adapters.tensors) // 2
    print(f"wrote {args.out}: {adapters.which_model} with {n} adapter(s) merged")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
