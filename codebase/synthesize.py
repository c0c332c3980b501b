"""Speak text in a reference voice with a trained VALL-E or Tortoise GPT checkpoint.

    python synthesize.py --model ../experiments/valle/models/50000_valle_ema.safetensors \\
        --text "Hello there." --prompt ref.wav --out hello.wav

Runs from ``codebase/`` or as ``python codebase/synthesize.py`` from the repository root. The
checkpoint carries the phoneme vocab, phonemizer and codec it was trained with (a Tortoise GPT:
its BPE tokenizer, mel features and DVAE, and ``--prompt`` may be repeated), so no YAML is
needed; ``--codec-option checkpoint=/new/path.safetensors`` points a moved mel_rvq codec to its
file. Several texts (``--text`` again, or ``--text-file`` with one per line) are written as
``out_0.wav``, ``out_1.wav`` ... next to ``--out``, or as ``0.wav`` ... in ``--out-dir``.

Exit codes: 0 done, 1 a bug (traceback), 2 a bad option, 4 an unusable prompt, 5 a model file
that is missing or not a VALL-E checkpoint, 6 the system refused (disk full, no permission).
``--debug`` prints the traceback of any error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

from models.audio.tts.synthesis import Synthesizer, sampling_problems
from utils.audio import save_audio
from utils.errors import UserError, run_command
from utils.options import add_debug_flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: a bad value raises :class:`UserError` naming the flag."""
    p = argparse.ArgumentParser(
        prog="synthesize.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="network file written by the trainer (models/<step>_<net>.safetensors)",
    )
    p.add_argument(
        "--lora",
        type=Path,
        help="LoRA adapters trained on --model (<step>_<net>[_ema]_lora.safetensors): merged "
        "into it before synthesis",
    )
    p.add_argument("--text", action="append", default=[], help="text to speak (repeatable)")
    p.add_argument("--text-file", type=Path, help="a UTF-8 file with one text per line")
    p.add_argument(
        "--prompt",
        required=True,
        type=Path,
        action="append",
        help="reference audio whose voice is used (a Tortoise GPT takes several: repeat it)",
    )
    p.add_argument(
        "--prompt-seconds",
        type=float,
        default=3.0,
        help="use the first N seconds of the prompt (0: all of it; default 3)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out.wav"),
        help="output wav (several texts: out_0.wav, out_1.wav ...); a missing folder is created",
    )
    p.add_argument("--out-dir", type=Path, help="write 0.wav, 1.wav ... into this folder")
    p.add_argument("--temperature", type=float, default=1.0, help="AR sampling temperature (>= 0)")
    p.add_argument("--top-k", type=int, default=0, help="AR top-k sampling (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="AR nucleus sampling, (0, 1] (1: off)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide logits of recently generated codes by this (> 0; 1: off)",
    )
    p.add_argument(
        "--nar-temperature", type=float, default=0.0, help="NAR sampling temperature (0: greedy)"
    )
    p.add_argument(
        "--max-duration",
        type=float,
        default=20.0,
        help="longest output per text in seconds (default 20, at most 600); a longer one is "
        "cut, with a warning",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="texts generated together (>= 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument(
        "--codec-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the stored codec config (value parsed as YAML; repeatable)",
    )
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.text_file is not None:
        if not args.text_file.is_file():
            raise UserError(f"--text-file {args.text_file} does not exist")
        lines = args.text_file.read_text(encoding="utf-8").splitlines()
        args.text += [line.strip() for line in lines if line.strip()]
    if not args.text:
        raise UserError("give at least one --text or a --text-file")
    check_numbers(args)
    if args.lora is not None and not args.lora.is_file():
        raise UserError(f"--lora {args.lora} does not exist")
    for prompt in args.prompt:
        if not prompt.is_file():
            raise UserError(f"--prompt {prompt} does not exist; give a recording of the voice")
    args.codec_options = parse_codec_options(args.codec_option)
    return args


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option in its range, all problems in one message."""
    problems = [
        (f"--{name.replace('_', '-')}", msg)
        for name, msg in sampling_problems(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            nar_temperature=args.nar_temperature,
            max_duration=args.max_duration,
        )
    ]
    if not args.prompt_seconds >= 0:
        problems.append(("--prompt-seconds", f"must be >= 0 (0: all), got {args.prompt_seconds}"))
    if args.batch_size < 1:
        problems.append(("--batch-size", f"must be >= 1, got {args.batch_size}"))
    if problems:
        raise UserError("; ".join(f"{flag} {msg}" for flag, msg in problems))


def parse_codec_options(items: list[str]) -> dict:
    """``["key=value", ...]`` -> dict, each value read as YAML (``pretrained=false`` -> False)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--codec-option {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise UserError(f"--codec-option {item!r}: the value is not valid YAML ({e})") from None
    return options


def output_paths(args: argparse.Namespace) -> list[Path]:
    n = len(args.text)
    if args.out_dir is not None:
        return [args.out_dir / f"{i}.wav" for i in range(n)]
    if n == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix or '.wav'}") for i in range(n)]


def check_writable(paths: list[Path], flag: str) -> None:
    """Make sure every output can be written, before anything is loaded: a missing folder is
    created; a folder that cannot be created or written to, or an output that is a folder, is
    a :class:`UserError` naming it."""
    for path in paths:
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a .wav file name (or use --out-dir)")
    for folder in dict.fromkeys(p.parent for p in paths):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".synthesize-check-"):
                pass  # permission bits say too little (root, read-only mounts): try it
        except OSError as e:
            raise UserError(
                f"{flag}: cannot write into {folder} ({e.strerror or e}); choose a folder you "
                f"can write to"
            ) from None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Speak the texts; errors are raised and printed by :func:`run_command`."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths = output_paths(args)
    check_writable(paths, "--out-dir" if args.out_dir is not None else "--out")

    t0 = time.perf_counter()
    synth = Synthesizer.from_checkpoint(
        args.model, device=args.device, codec_options=args.codec_options, lora=args.lora
    )
    if len(args.prompt) > 1 and isinstance(synth, Synthesizer):
        raise UserError(
            f"{args.model} is a VALL-E, which takes one --prompt (got {len(args.prompt)}); give "
            f"one recording of the voice"
        )
    clips = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    prompt = synth.encode_prompt(clips, seconds=args.prompt_seconds or None)
    lora = f" with the adapters of {args.lora} merged" if args.lora else ""
    print(
        f"loaded {args.model}{lora} on {synth.device} in {time.perf_counter() - t0:.1f} s; prompt "
        f"{synth.prompt_seconds(prompt):.2f} s from {', '.join(map(str, args.prompt))}"
    )
    for message in synth.text_warnings(args.text):
        warn(message)

    max_frames = synth.max_frames(args.max_duration)
    total_audio, total_time = 0.0, 0.0
    for start in range(0, len(args.text), args.batch_size):
        texts = args.text[start : start + args.batch_size]
        t0 = time.perf_counter()
        codes = synth.generate(
            texts,
            prompt,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            max_duration=args.max_duration,
            seed=args.seed + start,
            nar_temperature=args.nar_temperature,
        )
        wavs = synth.decode(codes)
        elapsed = time.perf_counter() - t0
        total_time += elapsed
        for path, text, c, wav in zip(paths[start:], texts, codes, wavs):
            save_audio(path, wav, synth.sample_rate)
            seconds = wav.numel() / synth.sample_rate
            total_audio += seconds
            print(f"wrote {path} ({seconds:.2f} s): {text}")
            if c.shape[-1] >= max_frames:
                warn(
                    f"{path} was cut at --max-duration {args.max_duration:g} s before the model "
                    f"ended {text!r}; raise --max-duration if the text is long, else the model "
                    f"is not stopping (check the prompt and the checkpoint)"
                )
    rtf = total_time / total_audio if total_audio else float("inf")
    print(
        f"{len(paths)} file(s), {total_audio:.2f} s of audio in {total_time:.2f} s "
        f"(real-time factor {rtf:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
