"""The ``datasets.<phase>`` section: loader options, the dataset's own options, validation.

One validator serves the trainer, ``python -m data.audio.prepare`` and the dataset self-check,
so a misspelled key fails the same way (full key path, did-you-mean) in every command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data import DATASETS
from utils.errors import DataError, UserError
from utils.options import import_plugins
from utils.schema import (
    ConfigError,
    NonNegativeInt,
    PositiveInt,
    Problems,
    bind_shared_section,
    construct,
    is_mapping,
    lookup,
)

log = logging.getLogger(__name__)


@dataclass
class DatasetSpec:
    """``datasets.<phase>``: loader options here, the rest goes to the dataset's constructor."""

    mode: str
    name: str = ""
    # The global batch: items per update over all ranks; each of N DDP/DeepSpeed ranks loads
    # batch_size / N (must divide). A dataset's token budget (max_tokens) is per rank instead.
    batch_size: PositiveInt | None = None
    n_workers: NonNegativeInt = 0
    phase: Literal["train", "val"] | None = None  # default: the section's name
    shuffle: bool | None = None  # default: true for train; validation never shuffles
    drop_last: bool | None = None  # default: true for train; validation keeps every item
    cls: Any = field(default=None, init=False)  # the registered dataset class
    kwargs: dict = field(default_factory=dict, init=False)  # its validated options


def validate_dataset(
    phase: str, options: Any, problems: Problems, base_dir: Path
) -> DatasetSpec | None:
    """Check ``datasets.<phase>``; problems are recorded, the spec returned when usable."""
    path = f"datasets.{phase}"
    if not is_mapping(options, path, problems):
        return None
    if "mode" not in options:
        problems.add(
            f"{path}.mode",
            f"missing required option; registered datasets: "
            f"{', '.join(DATASETS.names()) or '(none)'}",
        )
        return None
    cls = lookup(DATASETS, options["mode"], f"{path}.mode", problems)
    if cls is None:
        return None
    spec, kwargs = bind_shared_section(DatasetSpec, cls, options, path, problems, base_dir)
    if spec is None:
        return None
    spec.cls, spec.kwargs = cls, kwargs
    check = getattr(cls, "check_options", None)  # a dataset's own checks of its options
    if callable(check):
        check(kwargs, path, problems)
    if (spec.phase or phase) != "train":
        for key in ("shuffle", "drop_last"):
            if getattr(spec, key) is not None:
                log.warning(
                    "%s.%s has no effect: validation reads every item once, in order; remove it",
                    path,
                    key,
                )
    return spec


def validate_datasets(opt: dict) -> dict[str, DatasetSpec]:
    """Every ``datasets.<phase>`` of loaded options (:func:`utils.options.load_options`),
    after importing the experiment's plugins; raises ConfigError with every problem."""
    problems = Problems()
    base = Path(opt.get("_base_dir", "."))
    import_plugins(opt.get("plugins") or [], base)
    datasets = opt.get("datasets") or {}
    if not is_mapping(datasets, "datasets", problems):
        problems.raise_if_any(opt.get("_file"))
    specs = {phase: validate_dataset(phase, ds, problems, base) for phase, ds in datasets.items()}
    problems.raise_if_any(opt.get("_file"))
    return specs  # type: ignore[return-value]  # no None left once there are no problems


class EmptyDataset(DataError, ValueError):
    """A dataset section that yields no items (a wrong path, or every item screened out)."""


def build_dataset(spec: DatasetSpec, phase: str) -> Any:
    """The dataset of a validated section; its ``Runtime`` argument ``phase`` is the section's
    ``phase`` option or name. An empty dataset is an error naming the section; a ValueError
    of the dataset's constructor becomes a ``ConfigError`` at ``datasets.<phase>``."""
    where = f"datasets.{phase}"
    try:
        dataset = construct(spec.cls, spec.kwargs, {"phase": spec.phase or phase}, where)
    except UserError:
        raise
    except ValueError as e:  # the dataset's own checks of its options and files
        raise ConfigError([(where, str(e))]) from e
    if len(dataset) == 0:
        counts = getattr(dataset, "skip_counts", None)
        skipped = f"; skipped items per reason: {counts()}" if callable(counts) and counts() else ""
        raise EmptyDataset(
            f"datasets.{phase}: the dataset ({spec.cls.__name__}) has no items{skipped}; check "
            f"its path and screening options"
        )
    return dataset


def require_phase(specs: dict[str, DatasetSpec], phase: str, source: str | None) -> DatasetSpec:
    """``specs[phase]``, or a ConfigError listing the sections there are."""
    if phase not in specs:
        raise ConfigError(
            [
                (
                    f"datasets.{phase}",
                    f"missing; this file declares datasets: {', '.join(specs) or '(none)'}",
                )
            ],
            source,
        )
    return specs[phase]
