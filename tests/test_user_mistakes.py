"""A catalogue of typical user mistakes, each run through a real command's ``main`` inside the
error boundary (``utils.errors.run_command``), as ``python train.py ...`` would run it.

Each must end with one ``error: ...`` line that names the problem, its own exit code, and no
traceback. The catalogue's closing test counts the mistakes and the tracebacks left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import synthesize
import train
from data.audio import demo_corpus, espeak_synth, paired_dataset, phonemes, prepare
from helpers import make_corpus, make_experiment, toy_options, write_checkpoint, write_prompt
from utils.errors import (
    EXIT_CHECKPOINT,
    EXIT_DATA,
    EXIT_USAGE,
    run_command,
)
from utils.io import save_network

ROOT: Path  # set by the `root` fixture: the shared files every mistake may refer to


@dataclass
class Mistake:
    """A command line a user might type, the exit code it must give and words its error
    line must hold. ``argv`` entries may use ``{root}`` for the shared test folder."""

    name: str
    main: Callable[[list[str] | None], int]
    argv: list[str]
    code: int
    says: tuple[str, ...]


def _exp(**sections) -> str:
    """``{root}/<hash>.yml`` holding the toy experiment with ``sections`` merged in."""
    opt = toy_options(**sections)
    text = yaml.safe_dump(opt, sort_keys=False)
    path = ROOT / f"exp_{abs(hash(text)) % 10**10}.yml"
    path.write_text(text)
    return str(path)


def _paired(**dataset) -> str:
    """An experiment whose train set is a paired_voice_audio corpus (from ``make_corpus``)."""
    opt = {
        "name": "paired",
        "datasets": {
            "train": {
                "mode": "paired_voice_audio",
                "path": str(ROOT / "corpus" / "index.tsv"),
                "fetcher_mode": ["tsv"],
                "sample_rate": 16000,
                **dataset,
            }
        },
    }
    text = yaml.safe_dump(opt)
    path = ROOT / f"paired_{abs(hash(text)) % 10**10}.yml"
    path.write_text(text)
    return str(path)


def _prepare(**prepare_opts) -> str:
    """An experiment with one hdf5_codes dataset to prepare from ``prepare_opts``."""
    opt = {
        "name": "prep",
        "datasets": {
            "train": {
                "mode": "hdf5_codes",
                "path": str(ROOT / "prep" / "data.h5"),
                "batch_size": 2,
                "prepare": {
                    "fetcher_mode": "tsv",
                    "path": str(ROOT / "corpus" / "index.tsv"),
                    "codec": "mel_rvq",
                    **prepare_opts,
                },
            }
        },
    }
    text = yaml.safe_dump(opt)
    path = ROOT / f"prep_{abs(hash(text)) % 10**10}.yml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def root(tmp_path_factory):
    global ROOT
    ROOT = tmp_path_factory.mktemp("mistakes")
    make_corpus(ROOT / "corpus", n=4)
    write_checkpoint(ROOT / "valle.safetensors")
    write_checkpoint(ROOT / "bare.safetensors", phoneme_vocab=None, codec=None)
    write_prompt(ROOT / "ref.wav")
    (ROOT / "notaudio.wav").write_text("this is not audio")
    (ROOT / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (ROOT / "a_file").write_text("not a folder")
    (ROOT / "outdir").mkdir()
    (ROOT / "vocab.json").write_text(json.dumps({"symbols": ["x"]}))
    # the toy network with the wrong width: hidden 16 instead of 32
    toy_mlp = make_experiment(ROOT).networks["mlp"].factory
    save_network(
        toy_mlp(hidden=16),
        ROOT / "mlp16.safetensors",
        which_model="toy_mlp",
        kwargs={"hidden": 16},
    )
    torch.save({"not": "a training state"}, ROOT / "junk.state")
    return ROOT


def _synth(*extra: str) -> list[str]:
    """A synthesize.py command line that would work, plus ``extra`` (later flags win; a
    ``--prompt`` in ``extra`` replaces the working one, since prompts add up)."""
    prompt = [] if "--prompt" in extra else ["--prompt", "{root}/ref.wav"]
    return [
        "--model",
        "{root}/valle.safetensors",
        "--text",
        "the cat sat down",
        *prompt,
        "--out",
        "{root}/out/x.wav",
        "--device",
        "cpu",
        "--codec-option",
        "pretrained=false",
        *extra,
    ]


def catalogue() -> list[Mistake]:
    """Every mistake, as the parameters of the test below (built lazily: they need ROOT)."""
    t = train.main
    return [
        # --- train.py: the experiment file and its options (exit 2)
        Mistake("missing -opt file", t, ["-opt", "{root}/nope.yml"], EXIT_USAGE, ("nope.yml",)),
        Mistake("no -opt at all", t, [], EXIT_USAGE, ()),  # argparse's own usage error
        Mistake(
            "batch_size: 0",
            t,
            ["-opt", "@" + "batch0", "--dry-run"],
            EXIT_USAGE,
            ("datasets.train.batch_size", ">= 1"),
        ),
        Mistake("print_freq: 0", t, ["-opt", "@print0", "--dry-run"], EXIT_USAGE, ("print_freq",)),
        Mistake(
            "warmup_iter > niter",
            t,
            ["-opt", "@warmup", "--dry-run"],
            EXIT_USAGE,
            ("train.warmup_iter", "warm-up"),
        ),
        Mistake(
            "misspelled key",
            t,
            ["-opt", "@toy", "-o", "train.nitre=3", "--dry-run"],
            EXIT_USAGE,
            ("train.nitre", "did you mean 'niter'"),
        ),
        Mistake(
            "best_metric names no loss",
            t,
            ["-opt", "@toy", "-o", "train.best_metric=val/mes", "--dry-run"],
            EXIT_USAGE,
            ("train.best_metric", "did you mean 'val/mse'"),
        ),
        Mistake(
            "-o without =",
            t,
            ["-opt", "@toy", "-o", "train.niter", "--dry-run"],
            EXIT_USAGE,
            ("train.niter", "key.sub=value"),
        ),
        Mistake(
            "-o with bad YAML",
            t,
            ["-opt", "@toy", "-o", "train.niter=[1", "--dry-run"],
            EXIT_USAGE,
            ("invalid YAML",),
        ),
        Mistake(
            "niter is text",
            t,
            ["-opt", "@toy", "-o", "train.niter=lots", "--dry-run"],
            EXIT_USAGE,
            ("train.niter",),
        ),
        Mistake(
            "unknown model",
            t,
            ["-opt", "@toy", "-o", "networks.mlp.which_model_G=toy_mpl", "--dry-run"],
            EXIT_USAGE,
            ("toy_mpl", "toy_mlp"),
        ),
        Mistake(
            "a freeze pattern that matches no parameter",
            t,
            ["-opt", "@toy", "-o", "steps.fit.freeze=[body.0, haed.*]", "--dry-run"],
            EXIT_USAGE,
            ("steps.fit.freeze[1]", "matches 'haed.*'", "did you mean 'head.*'", "body.0.weight"),
        ),
        Mistake(
            "missing pretrained file",
            t,
            ["-opt", "@toy", "-o", "path.pretrain_model_mlp={root}/gone.safetensors"],
            EXIT_USAGE,
            ("path.pretrain_model_mlp", "gone.safetensors", "does not exist"),
        ),
        Mistake(
            "corrupt pretrained file",
            t,
            ["-opt", "@toy", "-o", "path.pretrain_model_mlp={root}/corrupt.safetensors"],
            EXIT_USAGE,
            ("corrupt.safetensors", "truncated or corrupt"),
        ),
        Mistake(
            "wrong-shape pretrained file",
            t,
            ["-opt", "@toy", "-o", "path.pretrain_model_mlp={root}/mlp16.safetensors"],
            EXIT_USAGE,
            ("mlp16.safetensors", "does not fit networks.mlp", "strict_load"),
        ),
        Mistake(
            "missing resume_state",
            t,
            ["-opt", "@toy", "-o", "path.resume_state={root}/9.state"],
            EXIT_CHECKPOINT,
            ("9.state", "does not exist", "'auto'"),
        ),
        Mistake(
            "resume_state that is not a training state",
            t,
            ["-opt", "@toy", "-o", "path.resume_state={root}/junk.state"],
            EXIT_CHECKPOINT,
            ("junk.state", "not a training state"),
        ),
        Mistake(
            "an injector that refuses its options when built",
            t,
            ["-opt", "@crop0", "-o", "train.niter=1"],
            EXIT_USAGE,
            ("steps.fit.injectors.crop", "crop_size must be >= 1"),
        ),
        Mistake(
            "batch larger than the dataset",
            t,
            ["-opt", "@toy", "-o", "datasets.train.batch_size=100", "-o", "train.niter=1"],
            EXIT_USAGE,
            ("batch_size 100", "lower batch_size"),
        ),
        # --- the dataset self-check and data preparation
        Mistake(
            "self-check of a phase that is not there",
            paired_dataset.main,
            ["-opt", "@paired", "--phase", "val", "--samples", "0"],
            EXIT_USAGE,
            ("datasets.val",),
        ),
        Mistake(
            "self-check of a corpus that is not there",
            paired_dataset.main,
            ["-opt", "@paired_gone", "--samples", "0"],
            EXIT_USAGE,
            ("nowhere/index.tsv", "does not exist", "`path`"),
        ),
        Mistake(
            "a dataset that refuses its options when built",
            paired_dataset.main,
            ["-opt", "@paired_val", "--samples", "0"],
            EXIT_USAGE,
            ("datasets.train", "val_fraction must be in [0, 1)"),
        ),
        Mistake(
            "self-check where every item is screened out",
            paired_dataset.main,
            ["-opt", "@paired_short", "--samples", "0"],
            EXIT_DATA,
            ("datasets.train", "no items", "too long"),
        ),
        Mistake(
            "prepare from a corpus path that is not there",
            prepare.main,
            ["-opt", "@prepare_gone"],
            EXIT_USAGE,
            ("nowhere",),
        ),
        Mistake(
            "prepare with a misspelled codec",
            prepare.main,
            ["-opt", "@prepare_codec"],
            EXIT_USAGE,
            ("mel_rvk", "mel_rvq"),
        ),
        Mistake("prepare, missing -opt", prepare.main, ["-opt", "{root}/x.yml"], EXIT_USAGE, ()),
        # --- synthesize.py
        Mistake(
            "missing model file",
            synthesize.main,
            _synth("--model", "{root}/gone.safetensors"),
            EXIT_CHECKPOINT,
            ("gone.safetensors", "does not exist"),
        ),
        Mistake(
            "corrupt model file",
            synthesize.main,
            _synth("--model", "{root}/corrupt.safetensors"),
            EXIT_CHECKPOINT,
            ("corrupt.safetensors", "corrupt"),
        ),
        Mistake(
            "model file without synthesis metadata",
            synthesize.main,
            _synth("--model", "{root}/bare.safetensors"),
            EXIT_CHECKPOINT,
            ("bare.safetensors", "'phoneme_vocab', 'codec'"),
        ),
        Mistake(
            "a training network that is not VALL-E",
            synthesize.main,
            _synth("--model", "{root}/mlp16.safetensors"),
            EXIT_CHECKPOINT,
            ("mlp16.safetensors", "metadata"),
        ),
        Mistake(
            "--out in a folder that cannot be made",
            synthesize.main,
            _synth("--out", "{root}/a_file/x.wav"),
            EXIT_USAGE,
            ("--out", "a_file", "cannot write"),
        ),
        Mistake(
            "--out is a folder",
            synthesize.main,
            _synth("--out", "{root}/outdir"),
            EXIT_USAGE,
            ("--out", "outdir", "is a folder"),
        ),
        Mistake(
            "--max-duration 1e9",
            synthesize.main,
            _synth("--max-duration", "1e9"),
            EXIT_USAGE,
            ("--max-duration", "600"),
        ),
        Mistake(
            "--max-duration 0",
            synthesize.main,
            _synth("--max-duration", "0"),
            EXIT_USAGE,
            ("--max-duration",),
        ),
        Mistake(
            "sampling options out of range, all at once",
            synthesize.main,
            _synth("--temperature", "-1", "--top-p", "0", "--top-k", "-2"),
            EXIT_USAGE,
            ("--temperature must be >= 0", "--top-p must be in (0, 1]", "--top-k"),
        ),
        Mistake(
            "--repetition-penalty 0",
            synthesize.main,
            _synth("--repetition-penalty", "0"),
            EXIT_USAGE,
            ("--repetition-penalty must be > 0",),
        ),
        Mistake(
            "--batch-size 0",
            synthesize.main,
            _synth("--batch-size", "0"),
            EXIT_USAGE,
            ("--batch-size must be >= 1",),
        ),
        Mistake(
            "--prompt-seconds -1",
            synthesize.main,
            _synth("--prompt-seconds", "-1"),
            EXIT_USAGE,
            ("--prompt-seconds",),
        ),
        Mistake(
            "misspelled --codec-option",
            synthesize.main,
            _synth("--codec-option", "griffin_lim_iter=2"),
            EXIT_USAGE,
            ("griffin_lim_iter", "did you mean 'griffin_lim_iters'"),
        ),
        Mistake(
            "unknown codec name",
            synthesize.main,
            _synth("--codec-option", "name=encodek"),
            EXIT_USAGE,
            ("encodek", "did you mean 'encodec'"),
        ),
        Mistake(
            "--codec-option without =",
            synthesize.main,
            _synth("--codec-option", "pretrained"),
            EXIT_USAGE,
            ("KEY=VALUE",),
        ),
        Mistake(
            "missing prompt",
            synthesize.main,
            _synth("--prompt", "{root}/gone.wav"),
            EXIT_USAGE,
            ("--prompt", "gone.wav", "does not exist"),
        ),
        Mistake(
            "a prompt that is not audio",
            synthesize.main,
            _synth("--prompt", "{root}/notaudio.wav"),
            EXIT_DATA,
            ("notaudio.wav", "unreadable"),
        ),
        Mistake(
            "two prompts for a VALL-E",
            synthesize.main,
            _synth("--prompt", "{root}/ref.wav", "--prompt", "{root}/ref.wav"),
            EXIT_USAGE,
            ("is a VALL-E, which takes one --prompt (got 2)",),
        ),
        Mistake(
            "missing --text-file",
            synthesize.main,
            _synth("--text-file", "{root}/gone.txt"),
            EXIT_USAGE,
            ("gone.txt",),
        ),
        Mistake(
            "a text with nothing to say",
            synthesize.main,
            _synth("--text", " "),
            EXIT_USAGE,
            ("gives no phonemes",),
        ),
        # --- the small tools
        Mistake(
            "phonemes: unknown language",
            phonemes.main,
            ["hello", "--language", "en-uss"],
            EXIT_USAGE,
            ("unknown espeak language 'en-uss'", "did you mean"),
        ),
        Mistake(
            "phonemes: a vocab file that is not one",
            phonemes.main,
            ["hello", "--vocab", "{root}/vocab.json"],
            EXIT_DATA,
            ("vocab.json", "phoneme vocab"),
        ),
        Mistake(
            "phonemes: missing vocab file",
            phonemes.main,
            ["hello", "--vocab", "{root}/gone.json"],
            EXIT_USAGE,
            ("gone.json",),
        ),
        Mistake(
            "espeak_synth: unknown voice",
            espeak_synth.main,
            ["hello", "--out", "{root}/e.wav", "--voice", "xx-nope"],
            EXIT_USAGE,
            ("no voice 'xx-nope'",),
        ),
        Mistake(
            "espeak_synth: unknown variant",
            espeak_synth.main,
            ["hello", "--out", "{root}/e.wav", "--variant", "klat"],
            EXIT_USAGE,
            ("did you mean 'klatt'",),
        ),
        Mistake(
            "espeak_synth: --rate 1000",
            espeak_synth.main,
            ["hello", "--out", "{root}/e.wav", "--rate", "1000"],
            EXIT_USAGE,
            ("--rate must be in 80..450",),
        ),
        Mistake(
            "demo_corpus: too many speakers",
            demo_corpus.main,
            ["--out", "{root}/demo", "--speakers", "99"],
            EXIT_USAGE,
            ("speakers=99",),
        ),
        Mistake(
            "demo_corpus: too few utterances",
            demo_corpus.main,
            ["--out", "{root}/demo", "--utterances", "3"],
            EXIT_USAGE,
            ("utterances=3",),
        ),
    ]


# experiments referred to as "@name" in a catalogue argv
EXPERIMENTS: dict[str, Callable[[], str]] = {
    "toy": lambda: _exp(),
    "batch0": lambda: _exp(datasets={"train": {"batch_size": 0}}),
    "print0": lambda: _exp(logger={"print_freq": 0}),
    "warmup": lambda: _exp(train={"niter": 5, "warmup_iter": 10}),
    "paired": lambda: _paired(),
    "paired_val": lambda: _paired(val_fraction=1.5),
    "crop0": lambda: _exp(
        steps={
            "fit": {
                "injectors": {
                    "crop": {"type": "random_audio_crop", "in": "x", "out": "xc", "crop_size": 0}
                }
            }
        }
    ),
    "paired_short": lambda: _paired(max_wav_length=100),
    "paired_gone": lambda: _paired(path=str(ROOT / "nowhere" / "index.tsv")),
    "prepare_gone": lambda: _prepare(path=str(ROOT / "nowhere" / "index.tsv")),
    "prepare_codec": lambda: _prepare(codec="mel_rvk"),
}
SEEN: dict[str, tuple[int, bool]] = {}  # mistake -> (exit code, printed a traceback)


def _resolve(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("@"):
            a = EXPERIMENTS[a[1:]]()
        out.append(a.replace("{root}", str(ROOT)))
    return out


def _ids() -> list[str]:
    return [
        (m.values[0] if hasattr(m, "values") else m).name.replace(" ", "_") for m in catalogue()
    ]


@pytest.mark.parametrize("mistake", catalogue(), ids=_ids())
def test_mistake_gives_an_error_line_and_its_exit_code(mistake: Mistake, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "CODEC_TTS_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)  # nothing may land in the repository
    code = run_command(mistake.main, _resolve(mistake.argv))
    err = capsys.readouterr().err
    SEEN[mistake.name] = (code, "Traceback" in err)
    assert "Traceback" not in err, err
    assert code == mistake.code, err
    assert "error:" in err, err
    for words in mistake.says:
        assert words in err, f"{words!r} not in:\n{err}"


def test_catalogue_counts(capsys):
    """The closing note: how many mistakes were run and how many still print a traceback."""
    n = len(catalogue())
    tracebacks = sorted(name for name, (_, tb) in SEEN.items() if tb)
    with capsys.disabled():
        print(f"\nuser-mistake catalogue: {len(SEEN)} of {n} run, {len(tracebacks)} traceback(s)")
        for name in tracebacks:
            print(f"  traceback: {name}")
    assert not tracebacks, tracebacks


# ----------------------------------------------------------------------------- warnings


def test_synthesize_warns_about_unspeakable_text_and_a_cut_output(capsys):
    """Not errors, but a user must hear of them: Chinese characters for an English model, and
    an output cut at --max-duration. A missing output folder is created."""
    out = ROOT / "new" / "sub" / "x.wav"
    argv = _resolve(_synth("--max-duration", "0.1", "--out", str(out)))
    argv[argv.index("the cat sat down")] = "hello 你好"
    assert run_command(synthesize.main, argv) == 0
    err = capsys.readouterr().err
    assert "warning: '你好' in 'hello 你好' cannot be spoken in 'en-us'" in err
    assert f"warning: {out} was cut at --max-duration 0.1 s" in err
    assert out.is_file() and "Traceback" not in err


def test_synthesize_checks_the_output_before_the_model(capsys):
    argv = _resolve(_synth("--model", "{root}/gone.safetensors", "--out", "{root}/a_file/x.wav"))
    assert run_command(synthesize.main, argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "a_file" in err and "gone.safetensors" not in err


@pytest.mark.parametrize(
    "main",
    [train.main, synthesize.main, prepare.main, paired_dataset.main, phonemes.main]
    + [espeak_synth.main, demo_corpus.main],
    ids=lambda m: m.__module__,
)
def test_every_command_documents_debug(main, capsys):
    assert run_command(main, ["--help"]) == 0
    assert "--debug" in capsys.readouterr().out
