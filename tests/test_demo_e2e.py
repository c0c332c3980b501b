"""The offline demo, shortened: corpus -> data.h5 -> training -> evaluation -> report -> speech.

Runs the README's command on ``experiments/valle_demo.yml`` (a copy, so its relative paths land
in a temporary folder) with a small corpus, a tiny model and a few steps.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import soundfile as sf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO

from data.audio.demo_corpus import build_demo_corpus

pytestmark = pytest.mark.slow

STEPS = 12
SHORT = [f"train.niter={STEPS}", "train.warmup_iter=2", f"train.val_freq={STEPS}",
         f"eval.every={STEPS}", f"logger.save_checkpoint_freq={STEPS}", "logger.print_freq=4",
         "logger.progress_bar=false", "logger.stdin_commands=false",
         "networks.valle.kwargs.d_model=32", "networks.valle.kwargs.n_layers=1",
         "networks.valle.kwargs.n_heads=2", "datasets.train.max_tokens=1200",
         "datasets.train.prepare.fit_minutes=1", "datasets.train.prepare.fit_iters=4",
         "eval.evaluators.samples.num_samples=4"]


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_demo_end_to_end(tmp_path):
    shutil.copy(REPO / "experiments" / "valle_demo.yml", tmp_path / "valle_demo.yml")
    corpus = build_demo_corpus(tmp_path / "demo_data" / "corpus", utterances=100, speakers=2,
                               workers=1, progress=False)
    overrides = [a for o in SHORT for a in ("-o", o)]
    done = run(["train.py", "-opt", str(tmp_path / "valle_demo.yml"), *overrides],
               cwd=REPO / "codebase")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout

    # It prepared both data files with the mel_rvq codec fitted on the corpus.
    data = tmp_path / "demo_data"
    assert (data / "train.h5").is_file() and (data / "heldout.h5").is_file()
    assert (data / "mel_rvq.safetensors").is_file()

    # The report: every figure of the learning check, before training and at the end.
    run_dir = tmp_path / "valle_demo"
    assert "step 0" in out and f"step {STEPS}" in out
    for row in ("held-out loss, AR", "baseline: repeat previous code",
                "accuracy where the code changes", "free-running duration / reference",
                "DTW mel distance to own reference", "own reference is the closest",
                "chance level"):
        assert row in out, row
    samples = run_dir / "samples" / str(STEPS)
    wavs = sorted(samples.glob("*.wav"))
    assert len(wavs) == 2 * 4  # generated + reference per sample
    assert all(sf.info(str(w)).frames > 0 for w in wavs)
    assert (run_dir / "models" / f"{STEPS}_valle_ema.safetensors").is_file()

    # TensorBoard has the same figures over steps.
    acc = EventAccumulator(str(run_dir / "tb_logger"))
    acc.Reload()
    for key in ("eval/tf_acc_ar", "eval/tf_acc_ar_repeat_baseline", "eval/own_closest"):
        assert [e.step for e in acc.Scalars(key)] == [0, STEPS], key
    assert {"val/ar", "loss/ar"} <= set(acc.Tags()["scalars"])

    # The printed synthesize command works as printed (with an output of our choosing).
    line = next(x for x in out.splitlines() if x.startswith("synthesize:"))
    args = shlex.split(line.split(":", 1)[1])
    assert args[:2] == ["python", "synthesize.py"]
    args = args[2:args.index("--out")] + ["--out", str(tmp_path / "hello.wav"),
                                         "--max-duration", "2"]
    spoken = run(["synthesize.py", *args], cwd=REPO / "codebase")
    assert spoken.returncode == 0, spoken.stderr[-3000:]
    assert sf.info(str(tmp_path / "hello.wav")).frames > 0
    assert corpus.heldout_utterances >= 10 and re.search(r"tensorboard --logdir \S+", out)
