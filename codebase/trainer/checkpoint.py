"""Checkpoint folders of a run: networks as safetensors, training state as a weights-only pickle.

Layout under the run root::

    models/<step>_<net>.safetensors        each network, carrying its which_model and kwargs
    models/<step>_<net>_ema.safetensors    its EMA copy, when there is one
    models/<step>_<net>[_ema]_lora.safetensors  a LoRA network: its adapters alone, naming
                                           their base file (see trainer/lora.py)
    training_state/<step>.state            optimizers, schedulers, RNG, counters
    training_state/<step>.<engine>/        files an engine writes itself (DeepSpeed's shards)

The state file is written last, so its existence marks a complete checkpoint. It records the
SHA-256 of every other file of its step (``files``) and a checksum of its own contents, so a
checkpoint damaged on disk is found before it is trained on: :meth:`CheckpointManager.verify`.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from models.lora import save_adapters
from utils.errors import CheckpointError
from utils.io import DIGEST_KEY, content_digest, file_sha256, load_torch, save_network, save_torch

logger = logging.getLogger(__name__)

# 2: the trainer's registered parts by name (1: fixed keys; still read, see
# trainer.training_state.upgrade)
STATE_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_STATE_NAME = re.compile(r"^(\d+)\.state$")
_MODEL_NAME = re.compile(r"^(\d+)_.+\.safetensors$")
_ENGINE_DIR = re.compile(r"^(\d+)\.[a-z_]+$")
# utils.io.atomic_write's temporary siblings: ".<name>.tmp-<pid>"
_LEFTOVER_TMP = re.compile(r"^\..+\.tmp-\d+$")


class CheckpointManager:
    """Saves, finds, prunes and resolves the checkpoints of one run folder."""

    def __init__(self, root: Path, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(
                f"keep_last must be None (keep all) or at least 1, got {keep_last}; "
                f"fix the checkpoint keep_last option"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.models_dir = self.root / "models"
        self.state_dir = self.root / "training_state"
        # Steps pruning must not delete, each with who holds it: the last good checkpoint
        # during a non-finite streak, the best one of train.best_metric ...
        self.protected: dict[int, set[str]] = {}

    # ------------------------------------------------------------------ paths

    def network_path(self, step: int, net: str, ema: bool = False, lora: bool = False) -> Path:
        """``<step>_<net>[_ema][_lora].safetensors``; ``_lora``: only the LoRA adapters."""
        suffix = ("_ema" if ema else "") + ("_lora" if lora else "")
        return self.models_dir / f"{step}_{net}{suffix}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.state_dir / f"{step}.state"

    def engine_dir(self, step: int, engine: str) -> Path:
        """Folder for the files an engine saves itself (written before the state file)."""
        return self.state_dir / f"{step}.{engine}"

    # ------------------------------------------------------------------ protection, cleanup

    def protect(self, step: int, holder: str = "") -> None:
        """Keep ``step``'s checkpoint through pruning until every ``holder`` that protected it
        has called :meth:`unprotect` (two reasons may keep the same step)."""
        self.protected.setdefault(step, set()).add(holder)

    def unprotect(self, step: int, holder: str = "") -> None:
        holders = self.protected.get(step, set())
        holders.discard(holder)
        if not holders:
            self.protected.pop(step, None)

    def remove_leftovers(self) -> tuple[int, int]:
        """Delete temporary files interrupted saves left behind; returns (files, bytes).

        Call only while no save is running (at start, on the rank that writes).
        """
        count = size = 0
        for folder in (self.models_dir, self.state_dir):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if _LEFTOVER_TMP.match(path.name) and path.is_file():
                    size += path.stat().st_size
                    path.unlink(missing_ok=True)
                    count += 1
        return count, size

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        networks: dict[str, tuple[nn.Module, str, dict]],
        state: dict[str, Any],
        ema: dict[str, nn.Module] | None = None,
        metadata: dict[str, str] | None = None,
        adapters: dict[str, dict] | None = None,
    ) -> Path:
        """Write all networks (and EMA copies), then the training state, then prune old steps.

        ``metadata`` (strings) goes into every network file, e.g. the phoneme vocabulary and
        codec config that synthesis needs besides the weights. A network in ``adapters`` is
        saved as its LoRA adapters alone (``<step>_<net>[_ema]_lora.safetensors``), with those
        arguments of :func:`models.lora.save_adapters` (``options``, ``base``, ``base_sha256``,
        ``extra``).
        """
        ema = ema or {}
        unknown = sorted(set(ema) - set(networks))
        if unknown:
            # An EMA copy is rebuilt from its network's which_model/kwargs, so it needs one.
            raise ValueError(
                f"EMA networks {unknown} have no matching entry in networks {sorted(networks)}; "
                f"pass the live network under the same name"
            )
        adapters = adapters or {}
        for name, (module, which_model, kwargs) in networks.items():
            extra = {**(metadata or {}), "step": str(step), "network": name}
            copies = [(module, False, extra)]
            if name in ema:
                copies.append((ema[name], True, {**extra, "ema": "true"}))
            for net, is_ema, net_extra in copies:
                path = self.network_path(step, name, ema=is_ema, lora=name in adapters)
                if name in adapters:
                    args = adapters[name]
                    save_adapters(
                        net,
                        path,
                        which_model=which_model,
                        kwargs=kwargs,
                        options=args["options"],
                        base=args["base"],
                        base_sha256=args["base_sha256"],
                        extra={**net_extra, **args.get("extra", {})},
                    )
                else:
                    save_network(net, path, which_model=which_model, kwargs=kwargs, extra=net_extra)
        full_state = {
            **state,
            "format_version": STATE_FORMAT_VERSION,
            "step": step,
            "files": self._file_checksums(step),
        }
        full_state[DIGEST_KEY] = content_digest(full_state)
        path = self.state_path(step)
        # verify: a state that weights_only loading refuses would only surface at resume time.
        save_torch(full_state, path, verify=True)
        self._prune(just_saved=step)
        return path

    def step_files(self, step: int) -> list[Path]:
        """The files of ``step`` besides its state: networks, EMA copies, engine files."""
        files = []
        if self.models_dir.is_dir():
            files += [
                p
                for p in self.models_dir.iterdir()
                if p.is_file() and (m := _MODEL_NAME.match(p.name)) and int(m.group(1)) == step
            ]
        if self.state_dir.is_dir():
            for folder in self.state_dir.iterdir():
                m = _ENGINE_DIR.match(folder.name)
                if m and int(m.group(1)) == step and folder.is_dir():
                    files += [p for p in folder.rglob("*") if p.is_file()]
        return sorted(files)

    def _file_checksums(self, step: int) -> dict[str, str]:
        return {str(p.relative_to(self.root)): file_sha256(p) for p in self.step_files(step)}

    def _prune(self, just_saved: int) -> None:
        if self.keep_last is None:
            return
        steps = self.steps()
        # The step just written always survives, even when resuming from an older checkpoint
        # left newer ones behind.
        recent = set(steps[-self.keep_last :]) | {just_saved}
        # Protected steps survive too; they do not lower oldest_kept, so the orphaned files of
        # steps between them and the recent ones are still removed.
        keep = recent | set(self.protected)
        oldest_kept = min(recent)
        for step in steps:
            if step not in keep:
                # State first: once it is gone the step no longer counts as complete.
                self.state_path(step).unlink(missing_ok=True)
        for path in self.state_dir.iterdir():
            match = _ENGINE_DIR.match(path.name)
            step = int(match.group(1)) if match else None
            if step is not None and path.is_dir() and step not in keep and step < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)
        if not self.models_dir.is_dir():
            return
        for path in self.models_dir.iterdir():
            match = _MODEL_NAME.match(path.name)
            if not match:
                continue
            step = int(match.group(1))
            if step not in keep and step < oldest_kept:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ finding

    def steps(self) -> list[int]:
        """Sorted steps that have a training state file (complete checkpoints)."""
        if not self.state_dir.is_dir():
            return []
        found = []
        for path in self.state_dir.iterdir():
            match = _STATE_NAME.match(path.name)
            if match and path.is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        """Newest checkpoint whose state and files are all intact (see :meth:`newest_intact`)."""
        return self.newest_intact()[0]

    def newest_intact(self) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
        """The newest intact checkpoint's state file and state, and the newer ones skipped
        with why."""
        skipped: list[tuple[Path, str]] = []
        for step in reversed(self.steps()):
            path = self.state_path(step)
            try:
                return path, self.verify(path), skipped
            except CheckpointError as e:
                skipped.append((path, str(e)))
        return None, None, skipped

    def verify(self, path: Path) -> dict[str, Any]:
        """Load a state file and check every file of its checkpoint against the checksums
        recorded at save; returns the state. Raises :class:`CheckpointError` naming each
        damaged or missing file."""
        path = Path(path)
        state = self.load_state(path)
        root = path.resolve().parent.parent  # the run folder that wrote it (may be another)
        problems = []
        for rel, expected in (state.get("files") or {}).items():
            file = root / rel
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file_sha256(file) != expected:
                problems.append(f"{file} is corrupt (its checksum no longer matches)")
        if problems:
            raise CheckpointError(
                f"checkpoint {path} is damaged:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        return state

    def load_state(self, path: Path) -> dict[str, Any]:
        """Load a training state file, check its own checksum and that this code reads it."""
        path = Path(path)
        state = load_torch(path)
        if not isinstance(state, dict) or "format_version" not in state:
            raise CheckpointError(
                f"{path} is not a training state written by CheckpointManager (no "
                f"'format_version'); point resume_state at a training_state/<step>.state file"
            )
        expected = state.pop(DIGEST_KEY, None)  # absent in files written before checksums
        if expected is not None and content_digest(state) != expected:
            raise CheckpointError(
                f"{path} is corrupt: its contents no longer match the checksum recorded when "
                f"it was written (damaged on disk or in a copy); resume from another step"
            )
        if state["format_version"] not in READABLE_FORMATS:
            raise CheckpointError(
                f"{path} has training state format version {state['format_version']!r}, this "
                f"code reads versions {READABLE_FORMATS}; resume with the code version that "
                f"wrote it"
            )
        return state

    def resolve_resume(self, resume_state: str | Path | None) -> Path | None:
        """The state file :meth:`resume` picks for the ``resume_state`` option."""
        return self.resume(resume_state)[0]

    def resume(self, resume_state: str | Path | None) -> tuple[Path | None, dict | None]:
        """The verified state file and state for the ``resume_state`` option (None, "auto"
        or a path); (None, None) to start fresh.

        ``auto`` takes the newest intact checkpoint, warning about each newer one it skips; if
        checkpoints exist but none is intact it refuses, rather than start over the old run.
        An explicit path must be intact too.
        """
        if resume_state is None:
            return None, None
        if isinstance(resume_state, str) and resume_state == "auto":
            path, state, skipped = self.newest_intact()
            for bad, why in skipped:
                logger.warning("resume_state auto: skipping %s: %s", bad, why)
            if path is None and skipped:
                listing = "\n".join(f"  - {why}" for _, why in skipped)
                raise CheckpointError(
                    f"resume_state is 'auto' but none of the {len(skipped)} checkpoint(s) in "
                    f"{self.root} is intact:\n{listing}\nRefusing to start over the old run. "
                    f"Restore the files from a backup; or start from a checkpoint's weights "
                    f"with path.pretrain_model_<net>; or start a new run with another `name`; "
                    f"or set path.resume_state: null to start over in this folder, "
                    f"overwriting it."
                )
            return path, state
        path = Path(resume_state)
        if not path.is_file():
            available = [str(self.state_path(s)) for s in self.steps()]
            listing = "\n".join(f"  - {a}" for a in available) if available else "  (none)"
            raise CheckpointError(
                f"resume_state {path} does not exist. Available training states in "
                f"{self.state_dir}:\n{listing}\nSet resume_state to one of them, or to 'auto' "
                f"for the newest intact one."
            )
        try:
            return path, self.verify(path)
        except CheckpointError as e:
            intact = self.latest()
            hint = (
                f"the newest intact checkpoint is {intact}; set resume_state to it (or 'auto')"
                if intact
                else "no checkpoint of this run is intact"
            )
            raise CheckpointError(f"{e}\nCannot resume from it: {hint}.") from None
