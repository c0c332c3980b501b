"""Prepare raw corpora once into ``data.h5`` files (see :mod:`data.audio.corpus_to_h5`).

    python -m data.audio.prepare -opt ../experiments/x.yml        (from codebase/)

Every dataset of ``mode: hdf5_codes`` with a ``prepare:`` section is prepared, or brought up
to date (items already in the file are skipped). Work goes to ``data.h5.partial`` and is
committed every few items, so a killed run resumes where it stopped; the finished file
replaces ``data.h5`` atomically, so ``data.h5`` is never half-written.
"""

from __future__ import annotations

import sys

from data.audio.corpus_to_h5 import prepare
from data.audio.hdf5_dataset import Hdf5CodesDataset
from data.spec import validate_datasets
from utils.errors import run_command
from utils.options import experiment_parser, load_cli


def main(argv: list[str] | None = None) -> int:
    """Prepare every dataset that asks for it; errors are raised for :func:`run_command`."""
    specs = load_cli(experiment_parser(__doc__).parse_args(argv), validate_datasets)
    done = set()
    for phase, spec in specs.items():
        opts = spec.kwargs.get("prepare") if issubclass(spec.cls, Hdf5CodesDataset) else None
        if opts is None or spec.kwargs["path"] in done:
            continue
        done.add(spec.kwargs["path"])
        report = prepare(spec.kwargs["path"], opts)
        print(f"datasets.{phase}: {spec.kwargs['path']}\n{report.describe()}")
        for item, reason in report.skipped:
            print(f"  skipped {item}: {reason}")
    if not done:
        print("nothing to prepare: no dataset has mode hdf5_codes with a prepare: section")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
