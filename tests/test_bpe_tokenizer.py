"""BPE tokenizer (golden DLAS/Tortoise vectors), its training command, DLAS filelists and the
``paired_voice_audio`` BPE options."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data.audio.bpe_tokenizer import (
    STOP_ID,
    TORTOISE_VOCAB,
    UNK_ID,
    BpeTokenizer,
    VocabError,
    main,
)
from data.audio.fetchers import fetch
from data.audio.paired_dataset import PairedVoiceAudioDataset
from data.spec import validate_datasets
from utils.errors import run_command
from utils.schema import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside the repository
GOLDEN = SHARED / "golden" / "tortoise" / "tokenizer_vectors.jsonl"
VECTORS = [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- tokenizer
@pytest.mark.slow  # 6 s: inflect's number words for 42 golden vectors
def test_golden_vectors_dlas_and_tortoise():
    assert len(VECTORS) == 42
    dlas, tortoise = BpeTokenizer(), BpeTokenizer(dlas_punctuation=False)
    assert (STOP_ID, UNK_ID, dlas.vocab_size) == (0, 1, 255)
    for v in VECTORS:
        assert dlas.clean(v["text"]) == v["dlas_cleaned"], v["text"]
        ids = dlas.encode(v["text"])
        assert ids == v["dlas_ids"], v["text"]
        assert dlas.decode(ids) == v["dlas_decoded"], v["text"]
        assert tortoise.clean(v["text"]) == v.get("tortoise_cleaned", v["dlas_cleaned"])
        assert tortoise.encode(v["text"]) == v.get("tortoise_ids", v["dlas_ids"]), v["text"]


def test_problem_reasons():
    tok = BpeTokenizer()
    assert tok.problem("Hello world.") is None
    assert "unknown characters: '@'" in tok.problem("mail me @ home")
    assert tok.problem("\u0242") == "empty text after cleaning: 'ɂ'"  # unidecode drops it
    assert tok.problem("Hello world.", max_tokens=6) == (
        "too long (text): 7 > max_text_length 6 tokens"
    )


def test_vocab_errors_name_the_file(tmp_path):
    with pytest.raises(VocabError, match="nope.json does not exist"):
        BpeTokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabError, match="bad.json is not a tokenizers JSON"):
        BpeTokenizer(tmp_path / "bad.json")
    data = json.loads(TORTOISE_VOCAB.read_text())
    data["added_tokens"][0]["content"] = "[PAD]"
    data["model"]["vocab"]["[PAD]"] = data["model"]["vocab"].pop("[STOP]")
    (tmp_path / "pad.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=r"pad.json: ids 0, 1, 2 must be \[STOP\]"):
        BpeTokenizer(tmp_path / "pad.json")


# ------------------------------------------------------------------------ DLAS filelists
def tone(path: Path, seconds: float = 0.7, sr: int = 8000, value: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    data = np.full_like(t, value) if value is not None else 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(str(path), data.astype(np.float32), sr, subtype="FLOAT")
    return path


GERMAN = ["Grüße aus Köln.", "Die Straße ist schön.", "Über den Fluß.", "Ärger über Öl."]


def filelist(root: Path, texts: list[str], extra: tuple[str, ...] = ()) -> Path:
    """An ai-voice-cloning style train.txt: ``audio/<n>.wav|text`` relative to the list."""
    lines = []
    for n, text in enumerate(texts):
        tone(root / "audio" / f"{n}.wav", value=0.1 * (n + 1))
        lines.append(f"audio/{n}.wav|{text}")
    (root / "train.txt").write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")
    return root / "train.txt"


def test_lj_reads_dlas_filelists(tmp_path):
    absolute = tone(tmp_path / "elsewhere" / "x.wav")
    lst = filelist(
        tmp_path / "voice", ["One.", "Two."], (f"{absolute}|Three.|0", "", "audio/9.wav", "|Four.")
    )
    items, skipped = fetch(["lj"], lst)
    assert [(u.path, u.text, u.id) for u in items] == [
        (tmp_path / "voice" / "audio" / "0.wav", "One.", "audio/0"),
        (tmp_path / "voice" / "audio" / "1.wav", "Two.", "audio/1"),
        (absolute, "Three.", str(absolute.with_suffix(""))),
    ]
    assert {u.speaker for u in items} == {"voice"} and items[1].source == f"{lst}:2"
    assert skipped == [
        (f"{lst}:5", "malformed line: expected audio path|text, got 1 field(s)"),
        (f"{lst}:6", "malformed line: expected audio path|text, got an empty audio path"),
    ]
    # an LJSpeech metadata.csv in the same folder still reads as id|text|normalized
    (tmp_path / "voice" / "metadata.csv").write_text("LJ1|Hi 1.|Hi one.\n")
    lj, _ = fetch("lj", tmp_path / "voice")
    assert [(u.path.name, u.text) for u in lj] == [("LJ1.wav", "Hi one.")]


# ------------------------------------------------------------------------- the dataset
def test_dataset_bpe_keys_and_skips(tmp_path):
    lst = filelist(
        tmp_path / "v",
        ["Hello world.", "The quick brown fox jumps over the lazy dog!", "mail me @ home", "ɂ"],
    )
    ds = PairedVoiceAudioDataset(
        lst,
        "lj",
        sample_rate=8000,
        use_bpe_tokenizer=True,
        max_text_length=20,  # tokens: "Hello world." is 7, the fox sentence 29
        load_conditioning=True,
        num_conditioning_candidates=2,
        conditioning_length=300,
        conditioning_source="self",
    )
    assert len(ds) == 1
    reasons = sorted(reason for _, reason in ds.skipped)
    assert reasons[0] == "empty text after cleaning: 'ɂ'"
    assert reasons[1] == "too long (text): 29 > max_text_length 20 tokens"
    assert reasons[2].startswith("unknown characters: '@'")
    assert ds.skip_counts() == {
        "empty text after cleaning": 1,
        "too long (text)": 1,
        "unknown characters": 1,
    }
    batch = ds.collate([ds[0], ds[0]])
    assert tuple(batch) == ds.batch_keys
    assert batch["padded_text"].tolist() == [[62, 84, 28, 2, 179, 79, 9]] * 2
    assert batch["padded_text"].dtype == batch["text_lengths"].dtype == torch.long
    assert batch["text_lengths"].tolist() == [7, 7]
    assert batch["real_text"] == ["Hello world."] * 2 and batch["filenames"][0].endswith("0.wav")
    assert batch["conditioning"].shape == (2, 2, 300)
    assert torch.allclose(batch["conditioning"], torch.tensor(0.1))  # crops of the clip itself
    assert batch["conditioning_contains_self"].tolist() == [True, True]


def test_dataset_padding_and_speaker_conditioning(tmp_path):
    lst = filelist(tmp_path / "v", ["Hi.", "Hello world.", "Yes."])
    ds = PairedVoiceAudioDataset(
        lst, "lj", sample_rate=8000, use_bpe_tokenizer=True, load_conditioning=True
    )
    batch = ds.collate([ds[0], ds[1]])
    hi = BpeTokenizer().encode("Hi.")
    assert batch["padded_text"].shape == (2, 7)
    assert batch["padded_text"][0].tolist() == hi + [STOP_ID] * (7 - len(hi))
    assert batch["text_lengths"].tolist() == [len(hi), 7]
    assert batch["conditioning_contains_self"].tolist() == [False, False]  # other clips
    assert not torch.allclose(batch["conditioning"][0], torch.tensor(0.1))
    plain = PairedVoiceAudioDataset(lst, "lj", sample_rate=8000, max_text_length=4)
    assert "padded_text" not in plain.batch_keys and plain.speakers() == ["v", "v"]
    assert plain.skipped[0][1] == "too long (text): 12 > max_text_length 4 characters"


def test_options_validated(tmp_path):
    lst = filelist(tmp_path / "v", ["Hi."])
    section = {"mode": "paired_voice_audio", "path": str(lst), "batch_size": 1}
    opt = {
        "_base_dir": str(tmp_path),
        "datasets": {
            "train": {**section, "load_aligned_codes": True},
            "val": {**section, "use_bpe_tokenizer": True, "tokenizer_vocab": "missing.json"},
        },
    }
    with pytest.raises(ConfigError) as e:
        validate_datasets(opt)
    text = str(e.value)
    assert "datasets.train.load_aligned_codes: load_aligned_codes: true is not supported" in text
    assert "discrete_token injector" in text
    assert "datasets.val.tokenizer_vocab: tokenizer vocabulary" in text
    assert "missing.json does not exist" in text
    with pytest.raises(ValueError, match="not supported"):
        PairedVoiceAudioDataset(lst, "lj", load_aligned_codes=True)


# ----------------------------------------------------------------------- training command
def test_train_command_from_filelist_and_yaml(tmp_path, capsys):
    lst = filelist(tmp_path / "de", GERMAN)
    assert any(UNK_ID in BpeTokenizer(cleaners="basic").encode(t) for t in GERMAN)  # ü, ß ...
    out = tmp_path / "tok" / "de.json"
    argv = ["train", "--filelist", str(lst), "--cleaners", "basic", "--vocab-size", "60"]
    assert run_command(main, [*argv, "--out", str(out)]) == 0
    assert "0 transcript(s) with [UNK]" in capsys.readouterr().out
    tok = BpeTokenizer(out, cleaners="basic")
    assert tok.vocab_size <= 60 and tok.tokenizer.id_to_token(2) == "[SPACE]"
    for text in GERMAN:
        ids = tok.encode(text)
        assert UNK_ID not in ids and STOP_ID not in ids
        assert tok.decode(ids) == tok.clean(text)

    yml = tmp_path / "exp.yml"
    yml.write_text(
        "datasets:\n  train:\n    mode: paired_voice_audio\n    path: de/train.txt\n"
        "    batch_size: 1\n    use_bpe_tokenizer: true\n    tokenizer_vocab: de2.json\n"
        "    text_cleaners: basic\n"
    )
    out2 = tmp_path / "de2.json"
    code = run_command(main, ["train", "-opt", str(yml), "--vocab-size", "60", "--out", str(out2)])
    assert code == 0 and "(basic cleaners)" in capsys.readouterr().out
    assert json.loads(out2.read_text())["model"] == json.loads(out.read_text())["model"]
    ds = PairedVoiceAudioDataset(
        lst, "lj", sample_rate=8000, use_bpe_tokenizer=True, tokenizer_vocab=out2,
        text_cleaners="basic",
    )  # fmt: skip
    assert len(ds) == 4 and not ds.skipped
    assert run_command(main, ["train", "--filelist", str(tmp_path / "no.txt"), "--out", "x"]) != 0
    assert "no.txt does not exist" in capsys.readouterr().err
