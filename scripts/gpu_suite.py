#!/usr/bin/env python
"""Helpers of scripts/gpu_suite.sh; the standard library only (runs before any wheel is in).

    python scripts/gpu_suite.py wheels .whl        # the wheels to install, one path a line
    python scripts/gpu_suite.py table LOGDIR       # the markdown table of the suite's figures

``wheels`` leaves out every wheel whose package is already installed at the same or a newer
version, and never installs torch, numpy and their kin over the machine's own builds.
``table`` reads each part's ``NN_<part>.log`` and ``NN_<part>.status`` (lines ``rc=0``,
``wall=12``, ``limit=90``) and turns the figures the bench scripts print into rows; a part
that failed, timed out or was skipped gets a row saying so, with its last error line.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

# The machine's own CUDA builds: a wheel of these would replace them (and break them).
PROTECTED = {"torch", "torchaudio", "torchvision", "triton", "numpy"}

Row = tuple[str, str, str, str]  # figure, value, unit, notes


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_key(version: str) -> tuple:
    """Numeric release tuple; enough to order the plain versions pinned in gpu_wheels.sh."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def wheels_to_install(folder: Path) -> Iterator[Path]:
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if _norm(name) in PROTECTED or _norm(name).startswith("nvidia-"):
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            yield wheel
            continue
        if _version_key(have) < _version_key(version):
            yield wheel


# --- reading the parts' logs -------------------------------------------------------------------

PROGRESS = re.compile(r"\d+%\|")  # tqdm bars


def last_error_line(log: str) -> str:
    """The line that says what went wrong: the last that looks like an error, else the last."""
    lines = [
        ln.strip()
        for ln in log.replace("\r", "\n").splitlines()
        if ln.strip() and not PROGRESS.search(ln) and not ln.startswith("$ ")
    ]
    for ln in reversed(lines):
        if re.search(r"Error|Exception|error:|Killed|FAILED|No such file", ln):
            return ln
    return lines[-1] if lines else "(no output)"


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _search(pattern: str, log: str) -> re.Match | None:
    return re.search(pattern, log, re.M)


def train_rows(log: str, label: str) -> list[Row]:
    """``label`` may hold ``{batch}``, filled from the run's own header line."""
    head = _search(
        r"^valle (\S+): ([\d.]+)M parameters, \S+ \((.*?)\), (\w+), batch (\d+) x (\d+)", log
    )
    speed = _search(r"([\d.]+) steps/s \| ([\d,]+) tokens/s", log)
    if not (head and speed):
        return []
    size, params, where, precision, b, seq = head.groups()
    label = label.format(batch=b)
    notes = f"{size} ({params}M), batch {b} x {seq} positions, {precision}, {where}"
    rows = [
        (f"{label} tokens/s", f"{_num(speed[2]):,.0f}", "tokens/s", f"{notes}; AR + NAR positions"),
        (f"{label} steps/s", speed[1], "steps/s", notes),
    ]
    mfu = _search(r"utilisation: ([\d.]+)% of (\d+) TFLOP/s \((.*?)\); achieved ([\d.]+)", log)
    rows.append(
        (
            f"{label} MFU",
            mfu[1] if mfu else "n/a",
            "%",
            f"{mfu[4]} TFLOP/s achieved, of {mfu[2]} TFLOP/s ({mfu[3]})"
            if mfu
            else f"no peak known for {where}",
        )
    )
    mem = _search(r"peak memory ([\d.]+) GiB", log)
    if mem:
        rows.append((f"{label} peak memory", mem[1], "GiB", "torch max_memory_allocated"))
    return rows


def inference_rows(log: str) -> list[Row]:
    head = _search(r"^valle (\S+): ([\d.]+)M parameters on (\S+) \((\w+)\); target (\S+) s", log)
    if not head:
        return []
    notes = f"{head[1]} ({head[2]}M), {head[5]} s target, {head[3]}, {head[4]}"
    rows = []
    cached = _search(r"AR with KV cache\s+([\d.]+) s\s+([\d.]+) tokens/s", log)
    if cached:
        rows.append(("AR decode, KV cache", cached[2], "tokens/s", notes))
    full = _search(
        r"AR without cache\s+([\d.]+) s\s+([\d.]+) tokens/s\s+"
        r"\(speed-up ([\d.]+)x; same greedy tokens: (\w+)\)",
        log,
    )
    if full:
        rows += [
            ("AR decode, recompute", full[2], "tokens/s", notes),
            ("KV cache speed-up", full[3], "x", f"same greedy tokens: {full[4]}"),
        ]
    rtf = _search(r"real-time factor ([\d.]+) \(([\d.]+)x faster", log)
    if rtf:
        rows.append(
            (
                "synthesis real-time factor",
                rtf[1],
                "s per s of audio",
                f"AR + NAR + EnCodec decode; {rtf[2]}x faster than real time; {notes}",
            )
        )
    return rows


def engines_rows(log: str) -> list[Row]:
    head = _search(
        r"^valle (\S+): ([\d.]+)M parameters, \S+ \((.*?)\), (\w+), batch (\d+) x (\d+)", log
    )
    if not head:
        return []
    where = f"{head[1]} ({head[2]}M), batch {head[5]} x {head[6]}, {head[4]}, {head[3]}"
    ratios = {m[1]: m[2] for m in re.finditer(r"^\s+(\S+) / local: (.*)$", log, re.M)}
    rows = []
    for m in re.finditer(
        r"^\s+(local|deepspeed|zero-\d)\s+([\d.]+)\s+([\d,]+)\s+(\S+)$", log, re.M
    ):
        label, steps, _, peak = m.groups()
        notes = f"vs local: {ratios[label]}; {where}" if label in ratios else where
        rows.append((f"engine {label} steps/s", steps, "steps/s", notes))
        if peak != "nan":
            rows.append(
                (
                    f"engine {label} peak memory",
                    peak,
                    "GiB",
                    "max_memory_allocated during the timed steps",
                )
            )
    return rows


REPORT_ROWS = {  # report row -> figure; the first and last evaluated step are shown
    "held-out loss, AR (teacher-forced)": "demo held-out AR loss",
    "AR top-1 accuracy": "demo AR top-1 accuracy",
    "baseline: repeat previous code": "demo repeat-previous baseline",
    "accuracy where the code changes": "demo AR accuracy where the code changes",
    "free-running duration / reference": "demo free-running duration / reference",
    "own reference is the closest": "demo own-closest rate",
    "chance level": "demo own-closest chance level",
}


def demo_rows(log: str, run_dir: Path | None) -> list[Row]:
    rows: list[Row] = []
    setup = _search(r"device (\S+); precision (\w+)", log)
    where = f"; {setup[1]}, {setup[2]}" if setup else ""
    rate = demo_step_rate(run_dir) if run_dir else None
    if rate:
        rows.append(
            (
                "demo training steps/s",
                f"{rate[0]:.2f}",
                "steps/s",
                f"median over {rate[1]} logging windows (evaluations excluded){where}",
            )
        )
    headers = re.findall(r"^[ \t]+((?:step \d+[ \t]*)+)$", log, re.M)  # "   step 0   step 400"
    if headers:
        steps = re.findall(r"step (\d+)", headers[-1])
        for label, figure in REPORT_ROWS.items():
            found = re.findall(rf"^[ \t]*{re.escape(label)}((?:[ \t]+-?[\d.]+)+)[ \t]*$", log, re.M)
            if found:
                values = found[-1].split()
                rows.append(
                    (
                        figure,
                        f"{values[0]} -> {values[-1]}",
                        "",
                        f"step {steps[0]} -> step {steps[-1]}{where}",
                    )
                )
    else:  # no report (stopped early): the last validation it printed
        vals = re.findall(r"validation at step (\d+): (.*)$", log, re.M)
        if vals:
            rows.append(("demo last validation", vals[-1][1], "", f"step {vals[-1][0]}{where}"))
    return rows


def demo_step_rate(run_dir: Path) -> tuple[float, int] | None:
    """Steps/s from the step times the trainer logged to TensorBoard: the median window, since
    the windows after an evaluation also hold the evaluation's time."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(str(run_dir / "tb_logger"), size_guidance={"scalars": 0})
    acc.Reload()
    if "perf/step_time_s" not in acc.Tags().get("scalars", []):
        return None
    times = [e.value for e in acc.Scalars("perf/step_time_s")]
    return (1.0 / statistics.median(times), len(times)) if times else None


# --- the table ----------------------------------------------------------------------------------


def parse_status(path: Path) -> dict[str, str]:
    """``key=value`` lines: rc (an exit code or ``skipped``), wall, limit, why."""
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln)


def wheels_rows(log: str) -> list[Row]:
    names = [
        Path(ln.strip()).name.split("-")[0]
        for ln in log.splitlines()
        if ln.strip().endswith(".whl")
    ]
    return [("wheels installed", str(len(names)), "", ", ".join(names) or "none needed")]


def tortoise_gpt_rows(log: str) -> list[Row]:
    """bench_unified_voice2.py: step time and peak memory, checkpointing off and on."""
    head = _search(r"^unified_voice2 --size (\S+): ([\d,]+) parameters, (.*)$", log)
    if not head:
        return []
    where = f"{head[1]} ({head[2]} parameters), {head[3]}"
    rows = []
    for m in re.finditer(r"^(on|off)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", log, re.M):
        setting, step, _, peak = m.groups()
        rows.append((f"unified_voice2 step, checkpointing {setting}", step, "s", where))
        rows.append((f"unified_voice2 peak memory, checkpointing {setting}", peak, "GiB", where))
    return rows


def part_rows(part: str, log: str, args: argparse.Namespace) -> list[Row]:
    parsers: dict[str, Callable[[str], list[Row]]] = {
        "wheels": wheels_rows,
        "train": lambda text: train_rows(text, "train"),
        "train_b32": lambda text: train_rows(text, "train (batch {batch})"),
        "inference": inference_rows,
        "engines": engines_rows,
        "tortoise_gpt": tortoise_gpt_rows,
        "demo": lambda text: demo_rows(text, args.demo_run),
    }
    parse = parsers.get(part)
    return parse(log) if parse else []


def table(logdir: Path, args: argparse.Namespace) -> str:
    rows: list[Row] = []
    for status_file in sorted(logdir.glob("*.status")):
        part = status_file.stem.split("_", 1)[1]
        status = parse_status(status_file)
        log_file = status_file.with_suffix(".log")
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        rc, wall, limit = status.get("rc", "?"), status.get("wall", "?"), status.get("limit", "?")
        if rc == "skipped":
            rows.append((part, "SKIPPED", "", status.get("why", "no time left")))
            continue
        found = part_rows(part, log, args)
        if rc != "0":
            why = (
                f"timed out after {limit} s" if rc in ("124", "137") else f"exit {rc}"
            ) + f": {last_error_line(log)}"
            rows.append((part, "FAILED", "", why[:200]))
        elif not found and part in (
            "train",
            "train_b32",
            "inference",
            "engines",
            "tortoise_gpt",
            "demo",
        ):
            rows.append((part, "FAILED", "", "ran, but printed none of the expected figures"))
        rows += found
        rows.append((f"{part} wall time", wall, "s", f"limit {limit} s"))
    lines = ["| figure | value | unit | notes |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels")
    w.add_argument("folder", type=Path)
    t = sub.add_parser("table")
    t.add_argument("logdir", type=Path)
    t.add_argument("--demo-run", type=Path, default=None, help="the demo's run folder")
    args = p.parse_args(argv)
    if args.cmd == "wheels":
        for wheel in wheels_to_install(args.folder):
            print(wheel)
    else:
        print(table(args.logdir, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
