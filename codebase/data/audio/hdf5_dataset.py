"""Training items from ``data.h5``: target codes, phoneme ids and a same-speaker prompt."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from data import register_dataset
from data.audio.bucket_sampler import BucketBatchSampler
from data.audio.corpus import split_fraction
from data.audio.corpus_to_h5 import PrepareOptions, check_data_file, check_prepare
from data.audio.corpus_to_h5 import prepare as prepare_corpus
from data.audio.h5_options import resolve_codec_config
from data.audio.phonemes import PhonemeVocab
from data.loader import pad_batch
from utils import distributed
from utils.schema import Problems, Runtime
from utils.seed import generator


@register_dataset("hdf5_codes")
class Hdf5CodesDataset(Dataset):
    """Items of a prepared ``data.h5`` (see :mod:`data.audio.corpus_to_h5`).

    Each item: ``codes`` [levels, frames], ``phonemes`` [P] (with bos/eos), ``prompt``
    [levels, prompt frames] cropped from another utterance of the same speaker, ``speaker``,
    ``text``, ``id``. ``collate`` pads with 0 and adds ``*_lengths``.

    Args:
        path: the data file. When missing and ``prepare`` is given, it is prepared first.
        prepare: how to build the file from a raw corpus (:class:`PrepareOptions`). An
            existing file prepared with other codec or phonemizer options is refused.
        max_tokens: token budget per batch (frames + phonemes + prompt, padded); or use the
            loader's ``batch_size``.
        prompt_frames: prompt length in code frames (a random crop; shorter prompts are whole).
        n_levels: use only the first N codebook levels (default: all).
        max_frames: skip items with more target frames than this.
        val_fraction: hold out this fraction of items (by id hash) as the ``val`` phase.
        seed: seeds the per-item randomness together with the epoch and the item index.
    """

    batch_keys = (
        "codes",
        "code_lengths",
        "phonemes",
        "phoneme_lengths",
        "prompt",
        "prompt_lengths",
        "speaker",
        "text",
        "id",
    )

    @staticmethod
    def check_options(kwargs: dict[str, Any], path: str, problems: Problems) -> None:
        """Validation hook (see :mod:`data.spec`): the ``prepare:`` section's names."""
        if isinstance(kwargs.get("prepare"), PrepareOptions):
            check_prepare(kwargs["prepare"], f"{path}.prepare", problems)

    def __init__(
        self,
        path: Path,
        prepare: PrepareOptions | None = None,
        max_tokens: int | None = None,
        prompt_frames: int = 150,
        n_levels: int | None = None,
        max_frames: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        phase: Runtime[str] = "train",
    ) -> None:
        self.path, self.max_tokens, self.prompt_frames = Path(path), max_tokens, prompt_frames
        self.seed, self.epoch, self.phase = seed, 0, phase
        if self.path.is_file() and prepare is not None:
            check_data_file(self.path, prepare)
        if not self.path.is_file():
            if prepare is None:
                raise FileNotFoundError(
                    f"{self.path} does not exist: run `python -m data.audio.prepare -opt <yml>` "
                    f"or add a `prepare:` section to this dataset so training prepares it"
                )
            if distributed.is_main():
                report = prepare_corpus(self.path, prepare)
                print(f"prepared {self.path}: {report.describe()}")
            distributed.barrier()
        with h5py.File(self.path, "r") as f:
            self.attrs = {k: f.attrs[k] for k in f.attrs}
            n = int(f.attrs["n_items"])
            self.code_offsets = f["code_offsets"][: n + 1]
            self.phoneme_offsets = f["phoneme_offsets"][: n + 1]
            ids = [_s(v) for v in f["ids"][:n]]
            speakers = [_s(v) for v in f["speakers"][:n]]
            texts = [_s(v) for v in f["texts"][:n]]
        self.n_levels = n_levels or int(self.attrs["n_levels"])
        if self.n_levels > int(self.attrs["n_levels"]):
            raise ValueError(
                f"n_levels {n_levels} > the {self.attrs['n_levels']} levels in {self.path}"
            )
        self.vocab = PhonemeVocab.from_json(self.attrs["vocab"])
        frames = np.diff(self.code_offsets)
        keep = [
            i
            for i in range(n)
            if (val_fraction <= 0 or (split_fraction(ids[i]) < val_fraction) == (phase == "val"))
            and (max_frames is None or frames[i] <= max_frames)
        ]
        if not keep:
            raise ValueError(
                f"{self.path}: no items for phase {phase!r} (val_fraction "
                f"{val_fraction}, max_frames {max_frames})"
            )
        self.rows = np.asarray(keep)
        self.ids = [ids[i] for i in keep]
        self.speakers = [speakers[i] for i in keep]
        self.texts = [texts[i] for i in keep]
        by_speaker: dict[str, list[int]] = defaultdict(list)
        for j, s in enumerate(self.speakers):
            by_speaker[s].append(j)
        self.by_speaker = dict(by_speaker)
        self._file: h5py.File | None = None
        self._pid = -1

    @property
    def codec_config(self) -> dict:
        """The codec the codes were made with; a codec file's path resolved against the data
        file's folder (the file stores it relative, so the folder may move)."""
        return resolve_codec_config(json.loads(self.attrs["codec"]), self.path.parent)

    def checkpoint_metadata(self) -> dict[str, str]:
        """What a model trained on this data needs at inference: saved in every checkpoint
        (the codec with an absolute path: the checkpoint does not lie beside the data)."""
        return {
            "phoneme_vocab": str(self.attrs["vocab"]),
            "phonemizer": str(self.attrs["phonemizer"]),
            "codec": json.dumps(self.codec_config),
        }

    def __len__(self) -> int:
        return len(self.rows)

    def _h5(self) -> h5py.File:
        if self._pid != os.getpid():  # h5py handles must not cross a fork (DataLoader workers)
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def _codes(self, j: int) -> torch.Tensor:
        r = self.rows[j]
        rows = self._h5()["codes"][self.code_offsets[r] : self.code_offsets[r + 1], : self.n_levels]
        return torch.from_numpy(rows.astype(np.int64)).t()  # [levels, frames]

    def frames(self, j: int) -> int:
        r = self.rows[j]
        return int(self.code_offsets[r + 1] - self.code_offsets[r])

    def phoneme_count(self, j: int) -> int:
        r = self.rows[j]
        return int(self.phoneme_offsets[r + 1] - self.phoneme_offsets[r]) + 2  # bos, eos

    def __getitem__(self, j: int) -> dict[str, Any]:
        r = self.rows[j]
        ids = self._h5()["phonemes"][self.phoneme_offsets[r] : self.phoneme_offsets[r + 1]]
        phonemes = torch.tensor([self.vocab.bos_id, *ids.tolist(), self.vocab.eos_id])
        g = generator(self.seed, j, self.epoch)
        item = {
            "codes": self._codes(j),
            "phonemes": phonemes,
            "speaker": self.speakers[j],
            "text": self.texts[j],
            "id": self.ids[j],
        }
        item["prompt"] = self._prompt(j, g)
        return item

    def _prompt(self, j: int, g: torch.Generator) -> torch.Tensor:
        """A crop of another utterance of the same speaker (itself if it is the only one)."""
        if self.prompt_frames <= 0:
            return torch.zeros(self.n_levels, 0, dtype=torch.long)
        others = [k for k in self.by_speaker[self.speakers[j]] if k != j] or [j]
        k = others[int(torch.randint(len(others), (1,), generator=g))]
        codes = self._codes(k)
        excess = codes.shape[1] - self.prompt_frames
        start = int(torch.randint(excess + 1, (1,), generator=g)) if excess > 0 else 0
        return codes[:, start : start + self.prompt_frames]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        batch["codes"], batch["code_lengths"] = pad_batch([it["codes"] for it in items])
        batch["prompt"], batch["prompt_lengths"] = pad_batch([it["prompt"] for it in items])
        batch["phonemes"], batch["phoneme_lengths"] = pad_batch(
            [it["phonemes"] for it in items], pad=self.vocab.pad_id
        )
        for key in ("speaker", "text", "id"):
            batch[key] = [it[key] for it in items]
        return batch

    def token_lengths(self) -> list[int]:
        """Per-item batch cost: target frames + phonemes + prompt frames."""
        return [
            self.frames(j) + self.phoneme_count(j) + self.prompt_frames for j in range(len(self))
        ]

    def make_batch_sampler(
        self,
        batch_size: int | None,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ) -> BucketBatchSampler:
        if self.max_tokens is None and batch_size is None:
            raise ValueError("hdf5_codes needs max_tokens (token budget) or batch_size")
        return BucketBatchSampler(
            self.token_lengths(),
            max_tokens=self.max_tokens,
            batch_size=None if self.max_tokens else batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            on_epoch=self._set_epoch,
        )

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # copied into workers, which the loader starts anew each epoch


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
