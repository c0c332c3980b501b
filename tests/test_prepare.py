"""data.h5 preparation (resumable, atomic) and the hdf5_codes dataset, on a tiny made-up corpus."""

import json

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

from data.audio import corpus_to_h5 as prep
from data.audio.corpus_to_h5 import PrepareOptions, prepare, read_ids
from data.audio.hdf5_dataset import Hdf5CodesDataset
from helpers import make_corpus
from utils.errors import DataError


def options(tsv, **kw):
    base = dict(
        fetcher_mode="tsv",
        path=tsv,
        codec="mel_rvq",
        codec_options={"n_levels": 2, "codebook_size": 16, "n_mels": 40, "hop_length": 320},
        fit_iters=3,
        flush_every=3,
    )
    base.update(kw)
    return PrepareOptions(**base)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sf.write(root / "quiet.wav", np.zeros(16000, np.float32), 16000)
    (root / "garbage.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    tsv = make_corpus(
        root,
        extra=[
            "missing.wav\tsome text\tspk0",
            "quiet.wav\t  \tspk0",
            "garbage.wav\tsome text\tspk1",
        ],
    )
    h5 = root / "data.h5"
    report = prepare(h5, options(tsv), progress=False)
    return h5, tsv, report


def test_prepare_writes_codes_phonemes_and_metadata(prepared):
    h5, _, report = prepared
    assert report.items_added == 8 and report.items_total == 8
    reasons = dict(report.skipped)
    assert "missing" in reasons["missing"] and "unreadable" in reasons["garbage"]
    assert "empty text" in reasons["quiet"] or "quiet" not in reasons
    with h5py.File(h5, "r") as f:
        assert f["codes"].dtype == np.int16 and f["codes"].shape[1] == 2
        assert f.attrs["n_items"] == 8 and len(f["code_offsets"]) == 9
        assert json.loads(f.attrs["codec"])["name"] == "mel_rvq"
        assert json.loads(f.attrs["phonemizer"])["language"] == "en-us"
        vocab = json.loads(f.attrs["vocab"])
        assert len(vocab["symbols"]) > 10
        frames = np.diff(f["code_offsets"][:])
        durations = f["durations"][:]
        assert np.allclose(frames, durations * 16000 // 320 + 1, atol=1)
    assert (h5.parent / "data_mel_rvq.safetensors").is_file()  # fitted codec beside the data
    assert not h5.with_name("data.h5.partial").exists()


def test_second_run_skips_done_items(prepared):
    h5, tsv, _ = prepared
    before = h5.stat().st_mtime_ns
    report = prepare(h5, options(tsv), progress=False)
    assert report.items_added == 0 and report.items_total == 8
    assert h5.stat().st_mtime_ns == before  # nothing rewritten


def test_killed_run_resumes_and_matches_a_straight_run(tmp_path, monkeypatch, prepared):
    h5_ref = prepared[0]
    tsv = make_corpus(tmp_path)
    codec_file = h5_ref.parent / "data_mel_rvq.safetensors"  # same codec as the reference
    opts = options(tsv, codec_checkpoint=codec_file)
    h5 = tmp_path / "data.h5"
    real_add, calls = prep._add_item, []

    def dying_add(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # killed mid-run: items 1-3 were committed (flush_every 3)
            raise KeyboardInterrupt
        return real_add(*args, **kwargs)

    monkeypatch.setattr(prep, "_add_item", dying_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(h5, opts, progress=False)
    assert not h5.exists()  # never a half-written data.h5
    partial = h5.with_name("data.h5.partial")
    with h5py.File(partial, "r") as f:
        assert f.attrs["n_items"] == 3
    monkeypatch.setattr(prep, "_add_item", real_add)
    report = prepare(h5, opts, progress=False)
    assert report.items_added == 5 and report.items_total == 8
    with h5py.File(h5, "r") as a, h5py.File(h5_ref, "r") as b:
        for key in ("codes", "phonemes", "code_offsets", "phoneme_offsets"):
            assert np.array_equal(a[key][:], b[key][:]), key
        assert a.attrs["vocab"] == b.attrs["vocab"]


def test_new_items_are_appended_and_options_must_match(tmp_path, prepared):
    h5_ref = prepared[0]
    tsv = make_corpus(tmp_path, n=4)
    opts = options(tsv, codec_checkpoint=h5_ref.parent / "data_mel_rvq.safetensors")
    h5 = tmp_path / "data.h5"
    prepare(h5, opts, progress=False)
    with h5py.File(h5, "r") as f:
        first_codes = f["codes"][:]
    make_corpus(tmp_path, n=6)
    report = prepare(h5, opts, progress=False)
    assert report.items_added == 2 and read_ids(h5)[:4] == ["u0", "u1", "u2", "u3"]
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["codes"][: len(first_codes)], first_codes)
    make_corpus(tmp_path, n=7)
    with pytest.raises(DataError, match="language: 'en-us' -> 'fr-fr'"):
        prepare(
            h5,
            options(tsv, codec_checkpoint=opts.codec_checkpoint, language="fr-fr"),
            progress=False,
        )


def test_dataset_items_prompts_and_batches(prepared):
    h5 = prepared[0]
    ds = Hdf5CodesDataset(h5, prompt_frames=10, max_tokens=200)
    assert len(ds) == 8
    item = ds[0]
    assert item["codes"].shape[0] == 2 and item["codes"].dtype == torch.long
    assert item["phonemes"][0] == ds.vocab.bos_id and item["phonemes"][-1] == ds.vocab.eos_id
    assert item["prompt"].shape == (2, 10)
    # the prompt is a crop of another utterance of the same speaker
    same = [k for k in ds.by_speaker[item["speaker"]] if k != 0]
    assert any(_contains(ds[k]["codes"], item["prompt"]) for k in same)
    assert ds[0]["prompt"].equal(item["prompt"])  # deterministic per (seed, epoch, index)
    sampler = ds.make_batch_sampler(None, True, 0, 0, 1, False)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(8))
    batch = ds.collate([ds[i] for i in batches[0]])
    assert set(batch) == set(ds.batch_keys)
    assert batch["codes"].shape[1] == 2
    assert batch["codes"].shape[2] == batch["code_lengths"].max()
    assert (
        batch["code_lengths"].max() * len(batches[0])
        + batch["phoneme_lengths"].max() * len(batches[0])
    ) <= 200 + 10 * len(batches[0])


def test_val_split_and_missing_file(prepared, tmp_path):
    h5 = prepared[0]
    train = Hdf5CodesDataset(h5, val_fraction=0.3, phase="train")
    val = Hdf5CodesDataset(h5, val_fraction=0.3, phase="val")
    assert not set(train.ids) & set(val.ids) and len(train) + len(val) == 8 and len(val) > 0
    with pytest.raises(FileNotFoundError, match="data.audio.prepare"):
        Hdf5CodesDataset(tmp_path / "nope.h5")


def _contains(codes, crop):
    n = crop.shape[1]
    return any(codes[:, s : s + n].equal(crop) for s in range(codes.shape[1] - n + 1))
