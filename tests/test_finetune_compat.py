"""Fine-tuning, compatible by construction: a pretrained network's recorded data description is
compared with the run's; data preparation can start from a checkpoint's vocabulary; grown
tables keep every old row."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from data.audio.corpus_to_h5 import prepare
from data.audio.phonemes import PhonemeVocab
from helpers import make_corpus
from models import build_network
from test_prepare import options
from trainer.checkpoint import CheckpointManager
from trainer.compatibility import check_pretrained, differences
from utils.io import grow_rows, load_module
from utils.schema import ConfigError

VALLE = {"n_phonemes": 20, "codebook_size": 16, "n_levels": 2, "d_model": 32}
VALLE.update(n_layers=1, n_heads=2)


def _vocab(*symbols):
    return PhonemeVocab(list(symbols)).to_json()


def test_identical_or_extended_descriptions_are_compatible():
    saved = {"phoneme_vocab": _vocab("a", "b"), "phonemizer": json.dumps({"language": "en-us"})}
    assert differences(saved, dict(saved)) == []
    extended = {**saved, "phoneme_vocab": _vocab("a", "b", "c")}  # ids kept, "c" appended
    assert differences(saved, extended) == []
    assert differences(saved, {"codec": "{}"}) == []  # nothing in common: nothing to compare


def test_a_shuffled_vocabulary_and_other_settings_are_named():
    saved = {
        "phoneme_vocab": _vocab("a", "b", "c"),
        "phonemizer": json.dumps({"language": "en-us", "with_stress": False}),
        "codec": json.dumps({"name": "mel_rvq", "n_levels": 4}),
        "mel_spectrogram": json.dumps({"sample_rate": 22050, "mel_norms": [1.0] * 80}),
    }
    current = {
        "phoneme_vocab": _vocab("a", "c", "d"),  # a new sorted list: "c" moved, "b" gone
        "phonemizer": json.dumps({"language": "de", "with_stress": False}),
        "codec": json.dumps({"name": "mel_rvq", "n_levels": 8}),
        "mel_spectrogram": json.dumps({"sample_rate": 22050, "mel_norms": [2.0] * 80}),
    }
    lines = differences(saved, current)
    text = "\n".join(lines)
    assert len(lines) == 4, text
    assert "phoneme vocabulary: 1 symbols have other ids (e.g. ['c'])" in text
    assert "base_vocab" in text and "grow_embeddings" in text  # the way out
    assert "phonemizer settings: language: 'en-us' -> 'de'" in text
    assert "codec: n_levels: 4 -> 8" in text
    assert "mel features: mel_norms: 80 of 80 values differ" in text


def test_a_codec_file_is_compared_by_content(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"same codec")
    b.write_bytes(b"same codec")
    saved = {"codec": json.dumps({"name": "mel_rvq", "checkpoint": str(a)})}
    moved = {"codec": json.dumps({"name": "mel_rvq", "checkpoint": str(b)})}
    assert differences(saved, moved) == []
    b.write_bytes(b"another codec")
    assert "checkpoint" in differences(saved, moved)[0]


def test_trainer_check_names_the_pretrained_file_and_key(tmp_path):
    net = build_network("valle", VALLE)
    run = CheckpointManager(tmp_path / "base")
    meta = {"phonemizer": json.dumps({"language": "en-us"})}
    run.save(7, {"valle": (net, "valle", VALLE)}, {}, metadata=meta)
    path = run.network_path(7, "valle")
    check_pretrained({"valle": path}, {"phonemizer": json.dumps({"language": "en-us"})})
    with pytest.raises(ConfigError, match="path.pretrain_model_valle") as e:
        check_pretrained({"valle": path}, {"phonemizer": json.dumps({"language": "fr"})})
    assert "'en-us' -> 'fr'" in str(e.value) and str(path) in str(e.value)


def test_grown_phoneme_table_gives_every_old_id_the_same_output(tmp_path):
    torch.manual_seed(0)
    base = build_network("valle", VALLE).eval()
    run = CheckpointManager(tmp_path / "base")
    run.save(1, {"valle": (base, "valle", VALLE)}, {})
    grown = build_network("valle", {**VALLE, "n_phonemes": 26}).eval()
    with pytest.raises(Exception, match="shape"):
        load_module(grown, run.network_path(1, "valle"), strict=True)  # without growing
    report = load_module(grown, run.network_path(1, "valle"), strict=True, grow=True)
    assert report.ok and len(report.grown) == 1, report.grown
    table = next(k for k in grown.state_dict() if grown.state_dict()[k].shape[0] == 26)
    old, new = base.state_dict()[table], grown.state_dict()[table]
    assert torch.equal(new[:20], old) and torch.allclose(new[20:], old.mean(0).expand(6, -1))
    phonemes = torch.randint(4, 20, (2, 9))  # old ids only
    lengths = torch.tensor([9, 6])
    prompt, prompt_lengths = torch.randint(0, 16, (2, 2, 5)), torch.tensor([5, 3])
    codes, code_lengths = torch.randint(0, 16, (2, 2, 7)), torch.tensor([7, 4])
    args = (phonemes, lengths, prompt, prompt_lengths, codes[:, 0], code_lengths)
    assert torch.equal(base.ar_logits(*args), grown.ar_logits(*args))


def test_grow_rows_leaves_other_shapes_alone():
    module = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 4))
    small = {"0.weight": torch.ones(3, 3), "1.weight": torch.zeros(4, 2), "1.bias": torch.ones(4)}
    out, grown = grow_rows(module, small)
    assert grown == ["0.weight: [3, 3] -> [5, 3]"]
    assert out["1.weight"].shape == (4, 2)  # columns differ: not a row growth, left as is


def test_prepare_can_start_from_a_checkpoints_vocabulary(tmp_path):
    tsv = make_corpus(tmp_path)
    base_symbols = ["zz", "a", "b"]  # ids 4, 5, 6: not in sorted order
    net = build_network("valle", VALLE)
    run = CheckpointManager(tmp_path / "base")
    meta = {"phoneme_vocab": PhonemeVocab(base_symbols).to_json()}
    run.save(1, {"valle": (net, "valle", VALLE)}, {}, metadata=meta)
    h5 = tmp_path / "data.h5"
    prepare(h5, options(tsv, base_vocab=run.network_path(1, "valle")), progress=False)
    with h5py.File(h5, "r") as f:
        vocab = PhonemeVocab.from_json(f.attrs["vocab"])
        record = json.loads(f.attrs["prepare_options"])
    assert vocab.id_to_symbol[:7] == ["<pad>", "<s>", "</s>", "<unk>", *base_symbols]
    assert len(vocab.id_to_symbol) > 7  # the corpus' symbols appended after them
    assert "base_vocab" in record
    # the trainer's check accepts the data against that checkpoint
    assert differences(meta, {"phoneme_vocab": vocab.to_json()}) == []
