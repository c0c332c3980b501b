"""scripts/gpu_suite.py: the wheels it picks and the table it makes of the parts' logs.

The logs below are the bench scripts' own output (a CPU smoke run, and the README's demo report);
a change to what they print should be made here too, or the GPU table loses its rows.
"""

import argparse
import importlib.util
import zipfile

from helpers import REPO

spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "scripts" / "gpu_suite.py")
gpu_suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_suite)

TRAIN = """valle reference: 155.2M parameters, cuda:0 (NVIDIA H200), bf16, batch 8 x 500 \
positions, checkpointing False
  4.10 steps/s | 32,800 tokens/s | 9,840 target frames/s
  model FLOPs utilisation: 3.1% of 989 TFLOP/s (dense bf16 peak of H200); achieved 30.6 TFLOP/s
  peak memory 6.2 GiB
"""
INFERENCE = """valle small: 7.4M parameters on cpu (fp32); target 1 s = 25 frames at 25 frames/s, \
batch 1, prefix 40 phonemes + 75 prompt frames
  AR with KV cache        2.22 s       11.3 tokens/s
  AR without cache        7.14 s        3.5 tokens/s  (speed-up 3.2x; same greedy tokens: True)
  synthesis AR+NAR        2.80 s; + EnCodec decode 0.57 s; 0.3 s of audio -> real-time factor \
10.121 (0.1x faster than real time)
"""
ENGINES = """valle tiny: 0.1M parameters, cuda:0 (NVIDIA H200), bf16, batch 2 x 80 positions, \
rank 0 of 1, deepspeed ZeRO-1,2
  engine       steps/s     tokens/s  peak GiB
  local           0.43          136      1.00
  zero-1          0.45          144      1.50
  zero-2          0.48          155      1.25
  zero-1 / local: throughput 1.05x, peak memory 1.50x
  zero-2 / local: throughput 1.14x, peak memory 1.25x
"""
DEMO = """evaluator samples:
                                         step 0     step 400
held-out loss, AR (teacher-forced)        5.606        3.042
held-out loss, NAR                        5.603        4.060
AR top-1 accuracy                         0.004        0.267
  baseline: repeat previous code          0.179        0.179
  accuracy where the code changes         0.005        0.175
NAR top-1 accuracy                        0.004        0.153
own reference is the closest              0.083        0.208
  chance level                            0.056        0.056
"""


def write_part(logdir, tag, log, **status):
    (logdir / f"{tag}.log").write_text(log)
    (logdir / f"{tag}.status").write_text("".join(f"{k}={v}\n" for k, v in status.items()))


TORTOISE_GPT = """unified_voice2 --size seed: 421,526,786 parameters, batch 32 (text 200, mel 250, \
2 clips x 87 frames), cuda bf16, 16 threads
checkpointing  step (s)  first step (s)  peak GPU memory (GiB)
off                1.21            3.40     61.30
on                 1.52            3.90     30.10
time ratio on/off: 1.26
"""


def make_table(logdir):
    return gpu_suite.table(logdir, argparse.Namespace(demo_run=None))


def rows(table):
    """{figure: [value, unit, notes]} of a markdown table."""
    cells = [r.strip()[2:-2].split(" | ") for r in table.splitlines()[2:]]
    return {c[0]: c[1:] for c in cells}


def test_table_rows_of_every_part(tmp_path):
    write_part(tmp_path, "01_train", TRAIN, rc=0, wall=30, limit=120)
    write_part(tmp_path, "02_train_b32", TRAIN, rc=0, wall=30, limit=120)
    write_part(tmp_path, "02_inference", INFERENCE, rc=0, wall=25, limit=150)
    write_part(tmp_path, "03_engines", ENGINES, rc=0, wall=60, limit=210)
    write_part(tmp_path, "03_tortoise_gpt", TORTOISE_GPT, rc=0, wall=90, limit=180)
    write_part(tmp_path, "04_demo", DEMO, rc=0, wall=200, limit=330)
    got = rows(make_table(tmp_path))
    assert got["unified_voice2 step, checkpointing on"][:2] == ["1.52", "s"]
    assert got["unified_voice2 peak memory, checkpointing off"][:2] == ["61.30", "GiB"]
    assert "421,526,786 parameters" in got["unified_voice2 step, checkpointing off"][2]
    assert got["train tokens/s"][:2] == ["32,800", "tokens/s"]
    assert got["train MFU"][0] == "3.1"
    assert "989 TFLOP/s (dense bf16 peak of H200)" in got["train MFU"][2]
    assert got["train peak memory"][0] == "6.2"
    assert got["train (batch 8) steps/s"][0] == "4.10"  # the batch its log names
    assert got["KV cache speed-up"][0] == "3.2"
    assert got["synthesis real-time factor"][0] == "10.121"
    assert got["engine zero-2 steps/s"][0] == "0.48"
    assert "peak memory 1.25x" in got["engine zero-2 steps/s"][2]
    assert got["engine zero-1 peak memory"][0] == "1.50"
    assert got["demo held-out AR loss"][0] == "5.606 -> 3.042"
    assert got["demo repeat-previous baseline"][0] == "0.179 -> 0.179"
    assert got["demo own-closest rate"][2].startswith("step 0 -> step 400")
    assert got["engines wall time"][:2] == ["60", "s"]


def test_failed_timed_out_and_skipped_parts_are_rows(tmp_path):
    write_part(
        tmp_path,
        "01_train",
        "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: out of memory\n",
        rc=1,
        wall=3,
        limit=120,
    )
    write_part(
        tmp_path,
        "02_demo",
        "[valle_demo] validation at step 200: val/ar 3.1, val/nar 4.0\n",
        rc=124,
        wall=330,
        limit=330,
    )
    write_part(tmp_path, "03_engines", "", rc="skipped", why="the suite budget was spent")
    write_part(tmp_path, "04_inference", "all fine, but no figures\n", rc=0, wall=1, limit=9)
    write_part(
        tmp_path, "05_train_b32", "$ python3 scripts/bench_train.py\n", rc=124, wall=9, limit=9
    )
    got = rows(make_table(tmp_path))
    assert got["train"][0] == "FAILED" and "exit 1: RuntimeError: CUDA error" in got["train"][2]
    assert got["demo"][0] == "FAILED" and got["demo"][2].startswith("timed out after 330 s")
    assert got["demo last validation"][2] == "step 200"
    assert got["engines"][:1] == ["SKIPPED"]
    assert got["inference"][0] == "FAILED"
    assert got["train_b32"][2] == "timed out after 9 s: (no output)"  # not the command line


def test_wheels_skips_installed_and_protected(tmp_path):
    for name in (
        "pytest-1.0-py3-none-any.whl",  # installed here, newer: skipped
        "pytest-999.0-py3-none-any.whl",  # installed, older than the wheel: in
        "no_such_package-1.0-py3-none-any.whl",  # missing: in
        "torch-999.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    ):  # never
        with zipfile.ZipFile(tmp_path / name, "w"):
            pass
    got = sorted(p.name for p in gpu_suite.wheels_to_install(tmp_path))
    assert got == ["no_such_package-1.0-py3-none-any.whl", "pytest-999.0-py3-none-any.whl"]
