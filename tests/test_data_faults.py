"""Nothing lost, nothing silent, in the data layer: a data.h5 made with other options is
refused key by key (in ``prepare`` and when training builds the dataset), a copied data folder
is the same data, and bad corpus lines are bad items, skipped with file and line."""

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import soundfile as sf

from data.audio.corpus_to_h5 import PrepareOptions, prepare, read_ids
from data.audio.fetchers import fetch
from data.audio.hdf5_dataset import Hdf5CodesDataset
from data.audio.paired_dataset import PairedVoiceAudioDataset, report
from data.spec import build_dataset, validate_datasets
from helpers import make_corpus
from models.audio.codecs import build_codec
from models.audio.codecs.mel_rvq import MelRVQCodec
from utils.errors import DataError
from utils.options import options_from_dict

CODEC = {"n_levels": 2, "codebook_size": 16, "n_mels": 40, "hop_length": 320}


def options(corpus, **kw):
    base = dict(
        fetcher_mode="tsv", path=corpus, codec="mel_rvq", codec_options=dict(CODEC), fit_iters=2
    )
    base.update(kw)
    return PrepareOptions(**base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared ``data/data.h5`` (with its fitted codec) of a corpus in another folder."""
    root = tmp_path_factory.mktemp("prepared")
    tsv = make_corpus(root / "corpus", n=4)
    prepare(root / "data" / "data.h5", options(tsv), progress=False)
    return root / "data", tsv


@pytest.fixture
def data_copy(data_dir, tmp_path):
    """A fresh copy of the prepared data folder (tests may change or move it)."""
    return shutil.copytree(data_dir[0], tmp_path / "data") / "data.h5", data_dir[1]


def dataset_via_spec(h5, prepare_section, base):
    """``datasets.train`` built as the trainer builds it (validated YAML, then constructed)."""
    section = {"mode": "hdf5_codes", "path": str(h5), "batch_size": 2, "prepare": prepare_section}
    specs = validate_datasets(options_from_dict({"datasets": {"train": section}}, base))
    return build_dataset(specs["train"], "train")


# ----------------------------------------------------------------- options must match the file
def test_changed_language_is_refused_by_prepare_and_by_the_dataset(data_copy, tmp_path):
    h5, tsv = data_copy
    changed = options(tsv, language="fr-fr")
    with pytest.raises(DataError) as prepared:
        prepare(h5, changed, progress=False)
    message = str(prepared.value)
    assert f"{h5} was prepared with other options" in message
    assert "  language: 'en-us' -> 'fr-fr'" in message
    assert f"delete or move {h5}" in message and "python -m data.audio.prepare -opt" in message
    assert "codec_options" not in message  # only what changed is listed
    with pytest.raises(DataError, match="language: 'en-us' -> 'fr-fr'"):
        Hdf5CodesDataset(h5, prepare=changed)
    section = {"fetcher_mode": "tsv", "path": str(tsv), "codec": "mel_rvq"}
    with pytest.raises(DataError) as built:
        dataset_via_spec(h5, {**section, "codec_options": CODEC, "language": "fr-fr"}, tmp_path)
    assert "language: 'en-us' -> 'fr-fr'" in str(built.value)
    assert len(dataset_via_spec(h5, {**section, "codec_options": CODEC}, tmp_path)) == 4


def test_changed_codec_option_is_refused_with_old_and_new_values(data_copy):
    h5, tsv = data_copy
    changed = options(tsv, codec_options={**CODEC, "n_levels": 3})
    for attempt in (
        lambda: prepare(h5, changed, progress=False),
        lambda: Hdf5CodesDataset(h5, prepare=changed),
    ):
        with pytest.raises(DataError) as e:
            attempt()
        assert "  codec_options.n_levels: 2 -> 3" in str(e.value)
        # the fitted codec's stored options would win over the new ones: it must go too
        assert f"the fitted codec {h5.parent / 'data_mel_rvq.safetensors'}" in str(e.value)
    dropped = options(tsv, codec_options={k: v for k, v in CODEC.items() if k != "n_mels"})
    with pytest.raises(DataError, match=r"codec_options.n_mels: 40 -> 80"):  # now the default
        Hdf5CodesDataset(h5, prepare=dropped)
    decode_only = options(tsv, codec_options={**CODEC, "griffin_lim_iters": 4})
    assert len(Hdf5CodesDataset(h5, prepare=decode_only)) == 4  # does not change the codes


def test_missing_or_refitted_codec_file_is_refused(data_copy):
    h5, tsv = data_copy
    codec_file = h5.parent / "data_mel_rvq.safetensors"
    MelRVQCodec(pretrained=False, **CODEC).save(codec_file)  # same options, other codebooks
    with pytest.raises(DataError, match="holds another fitted codec than the one the file"):
        prepare(h5, options(tsv), progress=False)
    codec_file.unlink()  # prepare would fit a new one: codes of another codec
    with pytest.raises(DataError, match=f"codec_checkpoint: {codec_file} does not exist"):
        prepare(h5, options(tsv), progress=False)
    assert not codec_file.exists()


def test_copied_data_folder_is_the_same_data(data_dir, tmp_path):
    h5 = shutil.copytree(data_dir[0], tmp_path / "moved" / "data") / "data.h5"
    original = data_dir[0].rename(data_dir[0].with_name("gone"))  # absolute paths would break
    try:
        with h5py.File(h5, "r") as f:
            assert json.loads(f.attrs["codec"])["checkpoint"] == "data_mel_rvq.safetensors"
        opts = options(data_dir[1])
        ds = Hdf5CodesDataset(h5, prepare=opts, prompt_frames=5)
        assert len(ds) == 4 and ds[0]["codes"].shape[0] == 2
        config = ds.codec_config
        assert config["checkpoint"] == str((h5.parent / "data_mel_rvq.safetensors").resolve())
        assert json.loads(ds.checkpoint_metadata()["codec"]) == config
        codec = build_codec(config.pop("name"), **config)
        assert codec.decode(ds[0]["codes"]).dim() == 1
        assert prepare(h5, opts, progress=False).items_added == 0
        make_corpus(data_dir[1].parent, n=5)  # a new item: appended to the moved file
        assert prepare(h5, opts, progress=False).items_added == 1
        assert read_ids(h5) == ["u0", "u1", "u2", "u3", "u4"]
    finally:
        original.rename(data_dir[0])
        make_corpus(data_dir[1].parent, n=4)


def test_file_from_before_the_record_is_still_read_and_checked(data_copy, tmp_path):
    h5, tsv = data_copy
    with h5py.File(h5, "r+") as f:  # as older versions wrote it: an absolute codec path
        del f.attrs["prepare_options"]
        codec = json.loads(f.attrs["codec"])
        codec["checkpoint"] = str(tmp_path / "old_place" / "data_mel_rvq.safetensors")
        f.attrs["codec"] = json.dumps(codec)
    ds = Hdf5CodesDataset(h5, prepare=options(tsv))  # gone from there, found beside the file
    assert ds.codec_config["checkpoint"] == str((h5.parent / "data_mel_rvq.safetensors").resolve())
    with pytest.raises(DataError, match="language: 'en-us' -> 'fr-fr'"):
        Hdf5CodesDataset(h5, prepare=options(tsv, language="fr-fr"))
    with pytest.raises(DataError, match="codec_options.n_levels: 2 -> 4"):
        prepare(h5, options(tsv, codec_options={**CODEC, "n_levels": 4}), progress=False)


# ----------------------------------------------------------------- bad lines are bad items
def tone(path, seconds, sr=16000, f0=150.0):
    t = np.arange(int(sr * seconds)) / sr
    wav = sum(np.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * wav).astype(np.float32), sr)


def faulty_lj(root):
    """An LJSpeech-style corpus: 4 good items and one of each fault (lines 3 to 8)."""
    for i, seconds in [(1, 0.7), (2, 0.8), (5, 0.01), (6, 0.6), (7, 0.9), (8, 0.75)]:
        tone(root / "wavs" / f"LJ00{i}.wav", seconds, f0=120 + 20 * i)
    lines = [
        b"LJ001|The cat sat down.|The cat sat down.",
        b"LJ002|A dog ran home.|A dog ran home.",
        b"LJ003|Caf\xe9 au lait|Caf\xe9 au lait",  # Latin-1, not UTF-8
        b"LJ004|too|many|fields|here",
        b"|no id|no id",
        b"LJ001|Another transcript.|Another transcript.",  # a repeated id
        b"LJ005|Ten milliseconds.|Ten milliseconds.",
        b"LJ006|...|...",  # nothing to say
        b"LJ007|She sells sea shells.|She sells sea shells.",
        b"LJ008|Open the door slowly.|",
    ]
    (root / "metadata.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root


GOOD = ["LJ001", "LJ002", "LJ007", "LJ008"]
COUNTS = {
    "not valid UTF-8": 1,
    "malformed line": 2,
    "duplicate id": 1,
    "too short": 1,
    "nothing to say": 1,
}


def assert_skips(skipped, csv):
    reasons = dict(skipped)
    assert reasons[f"{csv}:3"] == "not valid UTF-8: byte 0xe9 at column 10"
    assert (
        reasons[f"{csv}:4"].startswith("malformed line") and "got 5 field(s)" in reasons[f"{csv}:4"]
    )
    assert reasons[f"{csv}:5"].startswith("malformed line") and "an empty id" in reasons[f"{csv}:5"]
    assert reasons["LJ001"] == (
        f"duplicate id: {csv}:6 repeats the id of {csv}:1 (the first is kept)"
    )
    assert reasons["LJ005"].startswith("too short: 0.010 s < min_duration")
    assert reasons["LJ006"] == "nothing to say: transcript '...' has no letters or digits"
    assert len(skipped) == 6


def test_prepare_keeps_good_items_and_names_each_bad_line(tmp_path):
    root = faulty_lj(tmp_path / "LJ")
    h5 = tmp_path / "data.h5"
    result = prepare(h5, options(root, fetcher_mode="lj"), progress=False)
    assert result.items_added == 4 and read_ids(h5) == GOOD
    with h5py.File(h5, "r") as f:
        assert f["texts"][0].decode() == "The cat sat down."  # the first line of the id
    assert_skips(result.skipped, root / "metadata.csv")
    assert result.skip_counts() == COUNTS
    assert "skipped: 2 malformed line, 1 not valid UTF-8" in result.describe()


def test_paired_voice_audio_screens_the_same_way(tmp_path):
    root = faulty_lj(tmp_path / "LJ")
    ds = PairedVoiceAudioDataset(root, "lj", sample_rate=16000)
    assert [u.id for u in ds.items] == GOOD
    assert ds[0]["text"] == "The cat sat down." and ds[0]["wav"].shape[0] == 11200
    assert_skips(ds.skipped, root / "metadata.csv")
    assert ds.skip_counts() == COUNTS
    text = report(ds)  # what `python -m data.audio.paired_dataset` prints
    assert f"  {root / 'metadata.csv'}:3: not valid UTF-8: byte 0xe9 at column 10" in text
    assert "  duplicate id: 1" in text and "  too short: 1" in text


def test_tsv_and_libritts_skip_undecodable_lines_only(tmp_path):
    tone(tmp_path / "a.wav", 0.5)
    tone(tmp_path / "b.wav", 0.5)
    tsv = tmp_path / "list.tsv"
    tsv.write_bytes(
        "\ufeffpath\ttext\tspeaker\n".encode()  # a byte-order mark and a header
        + b"a.wav\tgood\ts\nb.wav\tbad \xff\xfe\ts\nb.wav\tfine\ts\n"
    )
    items, skipped = fetch("tsv", tsv)
    assert [(u.id, u.text) for u in items] == [("a", "good"), ("b", "fine")]
    assert skipped == [(f"{tsv}:3", "not valid UTF-8: byte 0xff at column 11")]
    chapter = tmp_path / "libri" / "100" / "10"
    for uid, text in [("100_10_1", b"first line\nsecond \xe9"), ("100_10_2", b"fine")]:
        tone(chapter / f"{uid}.wav", 0.4)
        (chapter / f"{uid}.normalized.txt").write_bytes(text)
    items, skipped = fetch("libritts", tmp_path / "libri")
    assert [u.id for u in items] == ["100_10_2"]
    assert skipped == [
        (str(chapter / "100_10_1.normalized.txt"), "not valid UTF-8: byte 0xe9 at line 2, column 8")
    ]
