import pickle
from pathlib import Path

import pytest
import torch

from data.audio.phonemes import (
    PhonemeVocab,
    Phonemizer,
    espeak_library,
    foreign_characters,
    main,
    split_symbols,
)
from helpers import build
from trainer.component import TrainerEnv
from trainer.injectors import INJECTORS
from trainer.injectors.text import PhonemizeInjector
from utils.schema import Problems

MARKS = ';:,.!?"'


@pytest.fixture(scope="module")
def en() -> Phonemizer:
    return Phonemizer("en-us")


@pytest.fixture(scope="module")
def en_stress() -> Phonemizer:
    return Phonemizer("en-us", with_stress=True)


@pytest.fixture
def env(tmp_path) -> TrainerEnv:
    return TrainerEnv(device=torch.device("cpu"), run_dir=tmp_path)


# --- espeak and the phonemizer ----------------------------------------------------------------


def test_uses_bundled_library_without_system_espeak(monkeypatch):
    import espeakng_loader

    monkeypatch.delenv("PHONEMIZER_ESPEAK_LIBRARY", raising=False)
    assert espeak_library() == espeakng_loader.get_library_path()


def test_bad_library_env_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PHONEMIZER_ESPEAK_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(RuntimeError, match="PHONEMIZER_ESPEAK_LIBRARY=.*nope.so is not a readable"):
        espeak_library()


def test_hello_world(en):
    symbols = en.phonemize_symbols(["hello world"])[0]
    assert symbols.count(" ") == 1 and symbols[0] == "h" and symbols[-1] == "d"
    assert en("hello world") == "".join(symbols)
    assert en.phonemize_symbols(["the cat"]) != en.phonemize_symbols(["a dog"])


def test_multi_character_phones_are_one_symbol(en):
    symbols = en.phonemize_symbols(["church, my eye"])[0]
    assert "tʃ" in symbols and "aɪ" in symbols
    assert "t" not in symbols  # tʃ was not split into t + ʃ


def test_stress_marks_only_with_stress(en, en_stress):
    plain = en.phonemize_symbols(["hello again"])[0]
    stressed = en_stress.phonemize_symbols(["hello again"])[0]
    assert "ˈ" in stressed and not {"ˈ", "ˌ"} & set(plain)
    assert [s for s in stressed if s not in "ˈˌ"] == plain  # marks are symbols of their own


def test_punctuation_kept_as_symbols_when_asked(en):
    text = 'Well, "yes"; no! Why?'
    kept = en.phonemize_symbols([text])[0]
    assert [s for s in kept if s in MARKS] == [",", '"', '"', ";", "!", "?"]
    dropped = Phonemizer("en-us", preserve_punctuation=False).phonemize_symbols([text])[0]
    assert not set(MARKS) & set(dropped)
    assert [s for s in kept if s not in MARKS] == dropped


def test_french_differs_from_english():
    fr = Phonemizer("fr-fr").phonemize_symbols(["table"])[0]
    assert fr and fr != Phonemizer("en-us").phonemize_symbols(["table"])[0]
    assert "ʁ" in Phonemizer("fr-fr").phonemize_symbols(["rouge"])[0]


def test_blank_texts_and_batches_stay_aligned(en):
    texts = ["Hello, world!", "", "  \n ", "I am fine.", "...", "Two\nlines here."]
    batch = en.phonemize_symbols(texts)
    assert batch[1] == [] and batch[2] == [] and batch[4] == [".", ".", "."]
    # phonemizer shifts punctuation across texts around blank lines; ours must not
    assert batch == [en.phonemize_symbols([t])[0] for t in texts]
    assert batch[3][-1] == "." and batch[5] == en.phonemize_symbols(["Two lines here."])[0]
    assert en([]) == [] and en("") == ""


def test_phonemizer_errors_and_config(en):
    with pytest.raises(
        ValueError, match="unknown espeak language 'en-uss'.*did you mean 'en-us'.*--list-languages"
    ):
        Phonemizer("en-uss")
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        en.phonemize_symbols("hello")
    with pytest.raises(TypeError, match="text 1 is a int"):
        en.phonemize_symbols(["a", 3])
    config = Phonemizer("fr-fr", with_stress=True, punctuation_marks=",.").config()
    assert config == {
        "language": "fr-fr",
        "preserve_punctuation": True,
        "with_stress": True,
        "punctuation_marks": ",.",
        "njobs": 1,
    }
    assert Phonemizer(**config).phonemize_symbols(["oui, non; bon"])[0].count(";") == 0


def test_phonemizer_pickles_for_dataloader_workers(en):
    clone = pickle.loads(pickle.dumps(en))
    assert clone._backend is None
    assert clone.phonemize_symbols(["good morning"]) == en.phonemize_symbols(["good morning"])


def test_split_symbols_without_espeak():
    out = split_symbols('ˈh|ə,  "w|ɜː|l|d..." ', MARKS)
    assert out == ["ˈ", "h", "ə", ",", " ", '"', "w", "ɜː", "l", "d", ".", ".", ".", '"']
    assert split_symbols("   ", MARKS) == []


def test_cli_prints_symbols(capsys):
    main(["Hi, you.", "--stress"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["h", "ˈ", "aɪ", ",", "␣", "j", "uː", "."]


# --- the vocab ----------------------------------------------------------------------------------


def test_vocab_build_encode_decode():
    vocab = PhonemeVocab.build([["b", "a", " "], ["a", "tʃ"]])
    assert vocab.id_to_symbol == ["<pad>", "<s>", "</s>", "<unk>", " ", "a", "b", "tʃ"]
    assert len(vocab) == 8 and vocab.pad_id == 0 and "tʃ" in vocab
    assert PhonemeVocab.build([["a", "tʃ"], ["b", " ", "a"]]) == vocab  # order-independent
    ids = vocab.encode(["tʃ", "a", " ", "b"])
    assert ids == [vocab.bos_id, 7, 5, 4, 6, vocab.eos_id]
    assert vocab.encode(["a"], add_bos_eos=False) == [5]
    assert vocab.decode(ids + [0, 0]) == ["tʃ", "a", " ", "b"]
    assert vocab.decode(torch.tensor(ids)) == ["tʃ", "a", " ", "b"]
    with pytest.raises(IndexError, match="phoneme id 99 is outside"):
        vocab.decode([99])


def test_vocab_counts_unknown_symbols():
    vocab = PhonemeVocab.build([["a"]])
    assert vocab.encode(["a", "ʒ", "ʒ", "q"], add_bos_eos=False) == [4, 3, 3, 3]
    assert vocab.unknown_count == 3 and vocab.unknown_symbols == {"ʒ": 2, "q": 1}
    assert vocab.decode([4, 3]) == ["a", "<unk>"]


def test_vocab_json_round_trip_and_equality(tmp_path):
    vocab = PhonemeVocab.build([["ˈ", "ɜː", " ", '"', "tʃ", "ɾ", "ᵻ"]])
    text = vocab.to_json()
    assert "ɜː" in text  # readable IPA, not \\u escapes
    again = PhonemeVocab.from_json(text)
    assert again == vocab and again.to_json() == text
    assert PhonemeVocab.from_dict(vocab.to_dict()) == vocab
    vocab.save(tmp_path / "v.json")
    assert PhonemeVocab.load(tmp_path / "v.json") == vocab
    assert vocab != PhonemeVocab(["a"]) and vocab != "not a vocab"


def test_vocab_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        PhonemeVocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: phoneme vocab is not valid JSON"):
        PhonemeVocab.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must start with"):
        PhonemeVocab.from_dict({"symbols": ["a", "b"]})
    with pytest.raises(ValueError, match="duplicate symbols \\['a'\\]"):
        PhonemeVocab(["a", "a"])
    with pytest.raises(ValueError, match="format 9 is not supported"):
        PhonemeVocab.from_dict({"format": 9, "symbols": list(PhonemeVocab.SPECIALS)})


# --- the injector -------------------------------------------------------------------------------

TEXTS = ["Hi.", "Hello there, my friend."]


@pytest.fixture
def vocab_file(tmp_path, en) -> Path:
    path = tmp_path / "vocab.json"
    PhonemeVocab.build(en.phonemize_symbols(TEXTS + ["world"])).save(path)
    return path


def test_injector_pads_with_bos_eos_and_lengths(env, vocab_file, en):
    assert INJECTORS.get("phonemize") is PhonemizeInjector
    inj = build(
        INJECTORS,
        {"type": "phonemize", "in": "text", "out": ["ph", "ph_len"], "vocab_file": str(vocab_file)},
        {"env": env},
    )
    out = inj({"text": TEXTS})
    ids, lengths = out["ph"], out["ph_len"]
    vocab = PhonemeVocab.load(vocab_file)
    symbols = en.phonemize_symbols(TEXTS)
    assert ids.dtype == torch.long and lengths.dtype == torch.long
    assert lengths.tolist() == [len(s) + 2 for s in symbols]
    assert ids.shape == (2, max(lengths.tolist()))
    short = int(lengths[0])
    assert ids[0, 0] == vocab.bos_id and ids[0, short - 1] == vocab.eos_id
    assert ids[0, short:].eq(vocab.pad_id).all() and ids[1, -1] == vocab.eos_id
    assert [vocab.decode(row) for row in ids] == symbols
    assert vocab.unk_id not in ids.tolist()[1]


def test_injector_cache_avoids_phonemizing_again(env, vocab_file):
    inj = build(
        INJECTORS,
        {
            "type": "phonemize",
            "in": "text",
            "out": "ph",
            "vocab_file": str(vocab_file),
            "cache_size": 2,
        },
        {"env": env},
    )
    calls: list[list[str]] = []
    real = inj.phonemizer.phonemize_symbols
    inj.phonemizer.phonemize_symbols = lambda texts: calls.append(list(texts)) or real(texts)
    first = inj({"text": TEXTS + [TEXTS[0]]})["ph"]
    assert calls == [TEXTS]  # a repeated text in one batch is phonemized once
    second = inj({"text": TEXTS})["ph"]
    assert calls == [TEXTS] and torch.equal(second, first[:2])
    inj({"text": ["world"]})  # evicts the least recently used text (TEXTS[0])
    assert list(inj._cache) == [TEXTS[1], "world"]
    inj({"text": TEXTS})
    assert calls[-1] == [TEXTS[0]]


def test_injector_without_vocab_gives_symbols(env, en):
    inj = build(
        INJECTORS,
        {"type": "phonemize", "in": "text", "out": ["sym", "n"], "with_stress": True},
        {"env": env},
    )
    out = inj({"text": ["Hi.", ""]})
    assert out["sym"] == [["h", "ˈ", "aɪ", "."], []] and out["n"].tolist() == [4, 0]


def test_injector_unknown_symbols_become_unk(env, tmp_path, caplog):
    path = tmp_path / "tiny.json"
    PhonemeVocab(["h"]).save(path)
    inj = build(
        INJECTORS,
        {"type": "phonemize", "in": "text", "out": "ph", "vocab_file": str(path)},
        {"env": env},
    )
    ids = inj({"text": ["Hi"]})["ph"]
    assert ids.tolist() == [[1, 4, 3, 2]] and inj.vocab.unknown_count == 1
    assert "['aɪ'] are not in the phoneme vocab" in caplog.text


def test_injector_option_and_input_errors(env, tmp_path):
    problems = Problems()
    PhonemizeInjector.check_options(
        {"language": "englsh", "vocab_file": "no.json"}, "steps.s.injectors.ph", problems, tmp_path
    )
    found = dict(problems.items)
    assert "unknown espeak language 'englsh'" in found["steps.s.injectors.ph.language"]
    assert "no.json not found" in found["steps.s.injectors.ph.vocab_file"]
    with pytest.raises(ValueError, match="`out` takes one or two keys"):
        build(INJECTORS, {"type": "phonemize", "in": "t", "out": ["a", "b", "c"]}, {"env": env})
    inj = build(INJECTORS, {"type": "phonemize", "in": "t", "out": "a"}, {"env": env})
    with pytest.raises(TypeError, match="state\\['t'\\] must be a list of texts, got str"):
        inj({"t": "hello"})
    with pytest.raises(TypeError, match="state\\['t'\\]\\[1\\] is a int"):
        inj({"t": ["hello", 5]})


def test_vocab_extended_keeps_ids():
    from data.audio.phonemes import PhonemeVocab

    old = PhonemeVocab.build([["b", "a"]])
    new = old.extended(["c", "a", "<pad>", "aa"])
    assert new.encode(["a", "b"]) == old.encode(["a", "b"])
    assert new.decode(new.encode(["aa", "c"], add_bos_eos=False)) == ["aa", "c"]
    assert len(new) == len(old) + 2


def test_foreign_characters_by_script():
    assert foreign_characters("hello 你好, мир! 你", "en-us") == ["你", "好", "м", "и", "р"]
    assert foreign_characters("你好 hello", "cmn") == []  # Latin is read everywhere
    assert foreign_characters("こんにちは 世界", "ja") == []
    assert foreign_characters("мир", "ja") == ["м", "и", "р"]
    assert foreign_characters("été, straße, 42 😀", "fr-fr") == []  # digits, symbols: not letters
    assert foreign_characters("你好", "xx-unknown") == []  # a language not in the table
