"""The model card (``README.md``) of an exported checkpoint: where it came from, which weights,
what data it speaks, how it scored, and the command that uses it (see :mod:`trainer.export`)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from data.audio.bpe_tokenizer import BpeTokenizer
from data.audio.phonemes import PhonemeVocab
from trainer.evaluators.base import scalar_prefix

TEXT = "The quick brown fox jumps over the lazy dog."
EVALUATOR_PREFIX = "evaluator."  # training-state parts of TrackedEvaluator histories


def model_card(
    src: Any,
    out: Path,
    files: list[Path],
    meta: dict[str, Any],
    *,
    dtype: str,
    lora: str,
    sample_step: int | None,
    samples: list[Path],
    config: Path | None,
) -> str:
    """The card's Markdown. ``src`` is a :class:`trainer.export.Source`; ``meta`` the exported
    network's metadata (which_model, kwargs and the data description)."""
    weights = "EMA" if src.ema else "raw (no EMA)"
    if not src.lora:
        adapters = "no LoRA"
    elif lora == "merge":
        adapters = f"LoRA adapters merged into the base ({src.file.name})"
    else:
        adapters = f"LoRA adapters kept apart: {files[0].name} on the base {files[1].name}"
    rows = [
        ("run", str(src.run.resolve())),
        ("step", f"{src.step}: {src.why}"),
        ("source file", str(src.file.resolve())),
        ("network", f"{src.net} ({meta['which_model']})"),
        ("weights", f"{weights}; {dtype}; {adapters}"),
    ]
    if src.best is not None and src.best.get("step") is not None:
        b = src.best
        rows.insert(
            2, ("best", f"{b['metric']} {b['value']:.5g} ({b['mode']}) at step {b['step']}")
        )
    rows += data_rows(meta)
    lines = [f"# {src.net} of {src.run.resolve().name}, step {src.step}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    lines += ["", "## Files", ""]
    lines += [f"- `{f.name}` ({f.stat().st_size / 1e6:.2f} MB)" for f in files]
    if config is not None:
        lines.append("- `config.yml`: the run's resolved experiment")
    lines += ["", "## Use", "", "```", usage(src, out, files, meta, lora, samples), "```", ""]
    lines += evaluation(src.state)
    lines += ["## Samples", ""]
    if samples:
        lines.append(
            f"From the evaluation of step {sample_step} (`samples/`, `*_ref` = reference):"
        )
        lines += [""] + [f"- `samples/{p.name}`" for p in samples]
    else:
        lines.append(f"The run wrote no samples at or before step {src.step}.")
    lines += ["", "## Model arguments", "", "```json", json.dumps(meta["kwargs"], indent=2), "```"]
    if config is not None:
        lines += ["", "## Resolved config (`config.yml`)", "", "```yaml", config.read_text(), "```"]
    return "\n".join(lines).rstrip() + "\n"


def data_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """What the network's inputs and outputs mean, from its metadata."""
    rows = []
    if "phoneme_vocab" in meta:
        rows.append(
            ("phoneme vocabulary", f"{len(PhonemeVocab.from_json(meta['phoneme_vocab']))} ids")
        )
    if "phonemizer" in meta:
        rows.append(("phonemizer", _compact(meta["phonemizer"])))
    if "codec" in meta:
        rows.append(("codec", _compact(meta["codec"])))
        fitted = json.loads(meta["codec"]).get("checkpoint")
        if fitted:  # referenced, not copied: a moved file is named at synthesis
            rows.append(
                ("codec file", f"{fitted} (not copied; elsewhere: --codec-option checkpoint=...)")
            )
    if "text_tokenizer" in meta:
        config = json.loads(meta["text_tokenizer"])
        size = BpeTokenizer.from_config(config).vocab_size
        rows.append(
            (
                "text tokenizer",
                f"{config.get('name')}: {size} tokens, {config.get('cleaners')} cleaners",
            )
        )
    if "mel_spectrogram" in meta:
        rows.append(("mel features", _compact(meta["mel_spectrogram"])))
    if "dvae" in meta:
        dvae = json.loads(meta["dvae"])
        rows.append(
            (
                "DVAE",
                f"{dvae.get('which_model')} from {dvae.get('weights')} (not copied; elsewhere: "
                f"--codec-option dvae_weights=...)",
            )
        )
    if "dtype" in meta:
        rows.append(("stored dtype", f"{meta['dtype']} (loaded as float32)"))
    return rows


def usage(
    src: Any, out: Path, files: list[Path], meta: dict, lora: str, samples: list[Path]
) -> str:
    """The ``synthesize.py`` command (run from ``codebase/``) for the exported files."""
    if meta["which_model"] not in ("valle", "unified_voice2"):
        return f'python -c "from models import load_network; net = load_network({str(files[0])!r})"'
    refs = [p for p in samples if p.stem.endswith("_ref")]
    prompt = str(refs[0]) if refs else "reference.wav"
    if src.lora and lora == "separate":
        model = f"--model {shlex.quote(str(files[1]))} --lora {shlex.quote(str(files[0]))}"
    else:
        model = f"--model {shlex.quote(str(files[0]))}"
    return (
        f"cd codebase && python synthesize.py {model} \\\n    --prompt {shlex.quote(prompt)} "
        f"--text {shlex.quote(TEXT)} --out hello.wav"
    )


def evaluation(state: dict[str, Any]) -> list[str]:
    """Per evaluator, the first and the last evaluation the checkpoint's state holds."""
    lines = ["## Evaluation", ""]
    found = False
    parts = {
        part[len(EVALUATOR_PREFIX) :]: value
        for part, value in state.items()
        if part.startswith(EVALUATOR_PREFIX) and isinstance(value, dict)
    }
    count = _evaluator_count(state, len(parts))
    for name, value in parts.items():
        history = value.get("history") or []
        if not history:
            continue
        found = True
        prefix = scalar_prefix(name, count)
        (s0, first), (s1, last) = history[0], history[-1]
        lines += [
            f"`{name}`: {len(history)} evaluation(s)",
            "",
            f"| figure | step {s0} (first) | step {s1} (last) |",
            "|---|---|---|",
        ]
        for key in last:
            a = f"{first[key]:.4g}" if key in first else "-"
            lines.append(f"| {prefix}{key} | {a} | {last[key]:.4g} |")
        lines.append("")
    if not found:
        lines += ["No evaluator history in this checkpoint (the run had no `eval` section).", ""]
    return lines


def _evaluator_count(state: dict[str, Any], tracked: int) -> int:
    """How many evaluators the run had (its config's), which decides their scalars' names."""
    try:
        evaluators = (yaml.safe_load(state["config"]).get("eval") or {}).get("evaluators")
    except (KeyError, AttributeError, yaml.YAMLError):
        return tracked
    return len(evaluators) if isinstance(evaluators, dict) else tracked


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
    except ValueError:
        return text


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
