"""Audio I/O, corpus fetchers, the paired_voice_audio dataset and its self-check CLI."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from data.audio.corpus import split_fraction
from data.audio.fetchers import FETCHERS, Utterance, fetch
from data.audio.paired_dataset import PairedVoiceAudioDataset
from data.loader import eval_loader
from helpers import REPO
from utils.audio import (
    AudioError,
    audio_info,
    load_audio,
    mel_spectrogram,
    save_audio,
    save_mel_png,
)
from utils.registry import RegistryError


def sine(path, sr=22050, seconds=0.5, channels=1, freq=440.0, amp=0.5, subtype=None):
    t = np.arange(int(sr * seconds)) / sr
    mono = amp * np.sin(2 * np.pi * freq * t)
    data = mono if channels == 1 else np.stack([mono] + [np.zeros_like(mono)] * (channels - 1), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), sr, subtype=subtype)
    return path


def constant(path, value, sr=8000, seconds=0.25):
    """A DC clip: its value tells which file a conditioning crop came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.full(int(sr * seconds), value, np.float32), sr, subtype="FLOAT")
    return path


def garbage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a RIFF file at all" * 10)
    return path


def nan_wav(path, sr=8000):
    """Passes soundfile.info (valid header) but fails load_audio (NaN samples)."""
    data = np.full(sr // 4, np.nan, np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype="FLOAT")
    return path


# ----------------------------------------------------------------------------- utils.audio
def test_load_audio_mono_resample_and_errors(tmp_path):
    stereo = sine(tmp_path / "st.wav", sr=44100, seconds=0.5, channels=2, amp=0.5)
    wav, rate = load_audio(stereo, 22050)
    assert rate == 22050 and wav.dim() == 1 and abs(wav.shape[0] - 11025) <= 1
    assert wav.dtype == torch.float32
    assert abs(wav.abs().max().item() - 0.25) < 0.02  # mean of (sine, silence) halves the level
    wav, rate = load_audio(stereo)
    assert rate == 44100 and wav.shape[0] == 22050
    assert audio_info(stereo) == (22050, 44100, 2)

    cases = {
        "missing file": tmp_path / "nope.wav",
        "unreadable": garbage(tmp_path / "g.wav"),
        "non-finite samples": nan_wav(tmp_path / "nan.wav"),
    }
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    cases["empty audio"] = empty
    for reason, path in cases.items():
        with pytest.raises(AudioError) as info:
            load_audio(path)
        assert info.value.reason == reason and str(path) in str(info.value)
    with pytest.raises(AudioError, match="unreadable"):
        audio_info(tmp_path / "g.wav")


def test_save_audio_clamps_pcm16_and_mel_png(tmp_path):
    wav = torch.tensor([0.0, 0.5, 1.5, -2.0, -0.25])
    save_audio(tmp_path / "o" / "x.wav", wav, 16000)
    assert sf.info(str(tmp_path / "o" / "x.wav")).subtype == "PCM_16"
    back, rate = load_audio(tmp_path / "o" / "x.wav")
    assert rate == 16000
    assert torch.allclose(back, torch.tensor([0.0, 0.5, 1.0, -1.0, -0.25]), atol=1e-4)
    assert not list((tmp_path / "o").glob(".*tmp*"))  # atomic write left no temp file

    sig = torch.sin(torch.arange(22050) * 0.1)
    mel = mel_spectrogram(sig, 22050)
    assert mel.shape == (80, 22050 // 256 + 1) and torch.isfinite(mel).all()
    save_mel_png(tmp_path / "m.png", mel, title="test")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="n_mels, frames"):
        save_mel_png(tmp_path / "bad.png", mel[None])


# ----------------------------------------------------------------------------- fetchers
def make_lj(root):
    """3 usable wavs (22.05k mono, 44.1k stereo, 16k), one missing, one empty transcript."""
    sine(root / "wavs" / "LJ001.wav", sr=22050, seconds=0.5)
    sine(root / "wavs" / "LJ002.wav", sr=44100, seconds=0.4, channels=2)
    sine(root / "wavs" / "LJ003.wav", sr=16000, seconds=0.3)
    sine(root / "wavs" / "LJ005.wav", sr=22050, seconds=0.3)
    (root / "metadata.csv").write_text(
        "LJ001|Hello there|Hello there, normalized.\n"
        "LJ002|Raw text only|\n"
        "LJ003|Third|Third one\n"
        "LJ004|No audio for this one|No audio for this one\n"
        "LJ005||\n"
        "a line without separators\n",
        encoding="utf-8",
    )
    return root


def test_fetch_lj(tmp_path):
    root = make_lj(tmp_path / "LJTiny")
    items, skipped = fetch("lj", root)
    assert [u.id for u in items] == ["LJ001", "LJ002", "LJ003", "LJ004", "LJ005"]
    assert items[0].text == "Hello there, normalized." and items[1].text == "Raw text only"
    assert items[2].path == root / "wavs" / "LJ003.wav"
    assert {u.speaker for u in items} == {"LJTiny"}
    assert len(skipped) == 1 and "metadata.csv:6" in skipped[0][0]
    assert skipped[0][1].startswith("malformed line")
    assert fetch(["lj"], root / "metadata.csv") == (items, skipped)  # DLAS list form, csv path
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        fetch("lj", tmp_path / "nowhere")


def make_libritts(root):
    split = root / "train-clean-100"
    for spk, chap, utt in [
        ("100", "10", "100_10_000001_000000"),
        ("100", "10", "100_10_000002_000000"),
        ("200", "20", "200_20_000001_000000"),
    ]:
        sine(split / spk / chap / f"{utt}.wav", sr=24000, seconds=0.3)
    (split / "100" / "10" / "100_10_000001_000000.normalized.txt").write_text("First, normalized.")
    (split / "100" / "10" / "100_10_000001_000000.original.txt").write_text("First original")
    (split / "100" / "10" / "100_10_000002_000000.original.txt").write_text("Only\noriginal ")
    (split / "200" / "20" / "200_20_000001_000000.normalized.txt").write_text("Other speaker.")
    sine(split / "200" / "20" / "200_20_000009_000000.wav", sr=24000, seconds=0.3)  # no .txt
    return split


def test_fetch_libritts(tmp_path):
    split = make_libritts(tmp_path / "LibriTTS")
    items, skipped = fetch("libritts", tmp_path / "LibriTTS")  # the corpus root: rglob
    assert [(u.speaker, u.text) for u in items] == [
        ("100", "First, normalized."),
        ("100", "Only original"),
        ("200", "Other speaker."),
    ]
    assert items[0].id == "100_10_000001_000000"
    assert len(skipped) == 1 and skipped[0][0].endswith("200_20_000009_000000.wav")
    assert skipped[0][1].startswith("missing transcript")
    one_speaker, _ = fetch("libritts", split / "100")
    assert [u.speaker for u in one_speaker] == ["100", "100"]


def make_tsv(root, lines, header=True):
    root.mkdir(parents=True, exist_ok=True)
    tsv = root / "list.tsv"
    tsv.write_text(
        ("path\ttext\tspeaker\n" if header else "") + "\n".join(lines) + "\n", encoding="utf-8"
    )
    return tsv


def test_fetch_tsv_and_lists(tmp_path):
    absolute = sine(tmp_path / "elsewhere" / "abs.wav")
    tsv = make_tsv(
        tmp_path / "corpus",
        [
            "a/one.wav\tHello\tspkA",
            f"{absolute}\tWorld\tspkB",
            "no tabs here",
            "two.wav\tonly two columns",
            "three.wav\ttext\t",
        ],
    )
    items, skipped = fetch("tsv", tsv)
    assert items == [
        Utterance(tmp_path / "corpus" / "a" / "one.wav", "Hello", "spkA", "a/one"),
        Utterance(absolute, "World", "spkB", str(absolute.with_suffix(""))),
    ]
    assert [s[0].rsplit(":", 1)[1] for s in skipped] == ["4", "5", "6"]
    assert all(r.startswith("malformed line") for _, r in skipped)
    no_header = make_tsv(tmp_path / "c2", ["x.wav\tHi\ts"], header=False)
    assert [u.id for u in fetch("tsv", no_header)[0]] == ["x"]

    lj = make_lj(tmp_path / "LJ")
    both, _ = fetch(["lj", "tsv"], [lj, tsv])
    assert len(both) == 5 + 2
    with pytest.raises(ValueError, match="2 fetcher_mode"):
        fetch(["lj", "tsv"], [lj, tsv, tsv])
    with pytest.raises(RegistryError, match="did you mean 'lj'"):
        fetch("ljj", lj)
    assert {"lj", "libritts", "tsv"} <= set(FETCHERS.names())


# ----------------------------------------------------------------------------- dataset
def skip_corpus(root):
    """3 good items (2 speakers, mixed rates/channels) and one item per skip reason."""
    sine(root / "good1.wav", sr=22050, seconds=0.5)
    sine(root / "good2.wav", sr=44100, seconds=0.4, channels=2)
    sine(root / "good3.wav", sr=16000, seconds=0.3)
    sine(root / "long.wav", sr=22050, seconds=3.0)
    sine(root / "notext.wav")
    sine(root / "longtext.wav")
    garbage(root / "corrupt.wav")
    return make_tsv(
        root,
        [
            "good1.wav\tFirst one.\tA",
            "good2.wav\tSecond one.\tA",
            "good3.wav\tThird one.\tB",
            "missing.wav\tNo file.\tB",
            "notext.wav\t \tA",
            "long.wav\tToo long audio.\tA",
            f"longtext.wav\t{'word ' * 30}\tB",
            "corrupt.wav\tGarbage.\tB",
            "malformed",
        ],
    )


def test_dataset_skips_and_counts(tmp_path):
    tsv = skip_corpus(tmp_path / "c")
    ds = PairedVoiceAudioDataset(
        tsv, "tsv", sample_rate=22050, max_wav_length=2 * 22050, max_text_length=50
    )
    assert [u.id for u in ds.items] == ["good1", "good2", "good3"]
    assert ds.skip_counts() == {
        "malformed line": 1,
        "missing file": 1,
        "empty text": 1,
        "too long (audio)": 1,
        "too long (text)": 1,
        "unreadable": 1,
    }
    reasons = dict(ds.skipped)
    assert "missing.wav" in reasons["missing"] and "66150 > max_wav_length 44100" in reasons["long"]
    assert ds.durations() == pytest.approx([0.5, 0.4, 0.3])
    assert ds.speakers() == ["A", "A", "B"]
    item = ds[1]  # 44.1k stereo -> 22.05k mono
    assert set(item) == {"wav", "wav_length", "text", "speaker", "path"}
    assert item["wav"].shape == (item["wav_length"],) and abs(item["wav_length"] - 8820) <= 1
    assert abs(item["wav"].abs().max().item() - 0.25) < 0.02
    assert item["text"] == "Second one." and item["speaker"] == "A"
    no_limits = PairedVoiceAudioDataset(tsv, "tsv")
    assert len(no_limits) == 5 and "too long (audio)" not in no_limits.skip_counts()


def test_decode_failure_at_getitem_is_skipped(tmp_path):
    root = tmp_path / "c"
    sine(root / "a.wav", sr=8000)
    nan_wav(root / "b.wav")
    sine(root / "c.wav", sr=8000, freq=200)
    ds = PairedVoiceAudioDataset(
        make_tsv(root, ["a.wav\tA.\ts", "b.wav\tB.\ts", "c.wav\tC.\ts"]), "tsv", sample_rate=8000
    )
    assert len(ds) == 3 and not ds.skipped  # the header is fine, so screening keeps it
    item = ds[1]
    assert item["text"] == "C."  # the next item, deterministically
    assert ds.skip_counts() == {"decode failed (non-finite samples)": 1}
    assert ds[1]["text"] == "C." and len(ds.skipped) == 1  # remembered, not retried
    assert ds.load_item(1)[0] == 2
    batch = next(iter(eval_loader(ds, 3, 0, 0, 1)))  # the whole loader keeps going
    assert batch["text"] == ["A.", "C.", "C."]
    nan_wav(tmp_path / "d" / "b.wav")
    bad = PairedVoiceAudioDataset(make_tsv(tmp_path / "d", ["b.wav\tB.\ts"]), "tsv")
    with pytest.raises(RuntimeError, match="none of the 1 items"):
        bad[0]


def test_val_split_deterministic_and_disjoint(tmp_path):
    root = tmp_path / "c"
    lines = []
    for k in range(30):
        sine(root / f"u{k}.wav", sr=8000, seconds=0.12)
        lines.append(f"u{k}.wav\tText {k}.\ts{k % 3}")
    tsv = make_tsv(root, lines)
    train = PairedVoiceAudioDataset(tsv, "tsv", sample_rate=8000, val_fraction=0.3, phase="train")
    val = PairedVoiceAudioDataset(tsv, "tsv", sample_rate=8000, val_fraction=0.3, phase="val")
    tr, va = {u.id for u in train.items}, {u.id for u in val.items}
    assert tr and va and not tr & va and tr | va == {f"u{k}" for k in range(30)}
    assert va == {f"u{k}" for k in range(30) if split_fraction(f"u{k}") < 0.3}
    again = PairedVoiceAudioDataset(
        tsv, "tsv", sample_rate=8000, val_fraction=0.3, phase="val", seed=5
    )
    assert [u.id for u in again.items] == [u.id for u in val.items]  # seed does not move it
    with pytest.raises(ValueError, match="val_fraction"):
        PairedVoiceAudioDataset(tsv, "tsv", val_fraction=1.0)


def conditioning_corpus(root):
    lines = []
    for k, spk in enumerate(["A", "A", "A", "B"]):
        constant(root / f"c{k}.wav", 0.1 * (k + 1), sr=8000, seconds=0.25)  # 2000 samples
        lines.append(f"c{k}.wav\tText {k}.\t{spk}")
    return make_tsv(root, lines)


def test_conditioning_from_same_speaker_and_collate(tmp_path):
    tsv = conditioning_corpus(tmp_path / "c")
    ds = PairedVoiceAudioDataset(
        tsv,
        "tsv",
        sample_rate=8000,
        load_conditioning=True,
        num_conditioning_candidates=3,
        conditioning_length=500,
        seed=1,
    )
    for i in range(4):
        cond = ds[i]["conditioning"]
        assert cond.shape == (3, 500)
        levels = {round(v, 2) for v in cond.flatten().tolist()}
        if i < 3:  # speaker A: other A utterances only
            assert levels <= {0.1, 0.2, 0.3} - {round(0.1 * (i + 1), 2)} and levels
        else:  # speaker B has one utterance: its own
            assert levels == {0.4}
        assert torch.equal(cond, ds[i]["conditioning"])  # seeded by (seed, index)
    padded = PairedVoiceAudioDataset(
        tsv, "tsv", sample_rate=8000, load_conditioning=True, conditioning_length=3000
    )
    cond = padded[3]["conditioning"]
    assert cond.shape == (1, 3000) and torch.all(cond[0, 2000:] == 0)
    assert torch.allclose(cond[0, :2000], torch.full((2000,), 0.4))

    short = sine(tmp_path / "c" / "short.wav", sr=8000, seconds=0.1)
    make_tsv(tmp_path / "c", ["c0.wav\tA.\tA", f"{short}\tShort.\tA", "c3.wav\tB.\tB"])
    ds = PairedVoiceAudioDataset(
        tmp_path / "c" / "list.tsv",
        "tsv",
        sample_rate=8000,
        load_conditioning=True,
        num_conditioning_candidates=2,
        conditioning_length=700,
    )
    batch = ds.collate([ds[0], ds[1], ds[2]])
    assert tuple(batch) == ds.batch_keys
    assert batch["wav"].shape == (3, 2000) and batch["wav_lengths"].tolist() == [2000, 800, 2000]
    assert batch["wav_lengths"].dtype == torch.long
    assert torch.all(batch["wav"][1, 800:] == 0) and batch["wav"][1, :800].abs().max() > 0.4
    assert batch["conditioning"].shape == (3, 2, 700)
    assert batch["text"] == ["A.", "Short.", "B."] and batch["speaker"] == ["A", "A", "B"]
    assert batch["path"][2].endswith("c3.wav")
    plain = PairedVoiceAudioDataset(tmp_path / "c" / "list.tsv", "tsv", sample_rate=8000)
    assert "conditioning" not in plain.batch_keys and "conditioning" not in plain[0]


# ----------------------------------------------------------------------------- the CLI
def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data.audio.paired_dataset", *map(str, args)],
        cwd=REPO / "codebase",
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_reports_and_writes_samples(tmp_path):
    skip_corpus(tmp_path / "corpus")
    opt = {
        "name": "exp",
        "datasets": {
            "train": {
                "mode": "paired_voice_audio",
                "batch_size": 2,
                "path": "corpus/list.tsv",
                "fetcher_mode": ["tsv"],
                "sample_rate": 16000,
                "max_wav_length": 32000,
                "max_text_length": 50,
            }
        },
    }
    yml = tmp_path / "exp.yml"
    yml.write_text(yaml.safe_dump(opt))
    r = run_cli("-opt", yml, "--samples", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "items: 3 (skipped 6)" in out and "hours" in out
    assert "speakers: 2; top: A (2), B (1)" in out
    assert sum(line.count("#") for line in out.splitlines()) > 0
    for uid, reason in [
        ("missing", "missing file"),
        ("notext", "empty text"),
        ("long", "too long (audio)"),
        ("longtext", "too long (text)"),
        ("corrupt", "unreadable"),
    ]:
        assert f"  {uid}: {reason}" in out
    assert "  missing file: 1" in out and "  malformed line: 1" in out
    folder = tmp_path / "exp" / "dataset_check" / "train"
    assert str(folder) in out
    wavs, pngs = sorted(folder.glob("*.wav")), sorted(folder.glob("*.png"))
    assert [p.stem for p in wavs] == ["good1", "good3"] == [p.stem for p in pngs]
    assert sf.info(str(wavs[0])).samplerate == 16000

    r = run_cli("-opt", yml, "--phase", "val")
    assert r.returncode == 2 and "datasets.val" in r.stderr
    opt["datasets"]["train"]["max_wav_lenght"] = 5
    yml.write_text(yaml.safe_dump(opt))
    r = run_cli("-opt", yml, "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "datasets.train.max_wav_lenght" in r.stderr
    assert "did you mean 'max_wav_length'" in r.stderr
