#!/usr/bin/env bash
# Every GPU figure the project promises, in one go on one H100/H200 (estimated at about 5 min,
# within an 8-minute budget), as one table.
#
#     bash scripts/gpu_suite.sh [--smoke] [OUTDIR]        # OUTDIR defaults to $OUT, if set
#
# Parts, each under its own time limit (a hung part cannot eat the others' time) and all within
# one overall budget (GPU_SUITE_BUDGET, 480 s), so the table is always printed; a part that
# fails is a FAILED row with its last error line, and the others still run:
#   wheels     install .whl/*.whl that the machine lacks into /tmp/site (PYTHONPATH)
#   train      bench_train.py --size reference, bf16: tokens/s, MFU against the GPU's bf16
#              peak (a table keyed by the device name; PEAK_TFLOPS=... overrides), memory
#   train_b32  the same at batch 32 (batch 8 leaves a big GPU partly idle)
#   inference  bench_inference.py --size reference, 5 s of audio: AR with KV cache vs recompute, RTF
#   engines    bench_engines.py --size reference: local vs DeepSpeed ZeRO-1 and ZeRO-2
#   tortoise_gpt  bench_unified_voice2.py --size seed, bf16, the seed gpt.yml's micro-batch
#              (32): step time and peak memory with gradient checkpointing off and on
#   demo_data  only when the demo's data files were not carried: corpus + data.h5 (~2 min)
#   demo       experiments/valle_demo.yml on the GPU for GPU_SUITE_DEMO_STEPS (400) steps:
#              steps/s and the rows of its learning report (from a copy of the YAML in the
#              work folder, so nothing is written under experiments/)
# With OUTDIR it writes OUTDIR/gpu_suite.md (the table), OUTDIR/gpu_suite_logs.txt (every
# part's log) and OUTDIR/demo_samples.tar.gz (the demo's last generated/reference wavs).
#
# On the device machine (bare, no network): first, here,
#     bash scripts/gpu_wheels.sh                               # .whl/, about 17 MiB
#     (cd codebase && python -m data.audio.prepare -opt ../experiments/valle_demo.yml)
# (the second builds experiments/demo_data/, ~2-8 min; only its three small files travel), then
#     run  command: bash scripts/gpu_suite.sh 2>&1 | tee $OUT/console.txt
#          carry:   [".whl", "experiments/demo_data/train.h5", "experiments/demo_data/heldout.h5",
#                    "experiments/demo_data/mel_rvq.safetensors"]
#          timeout_s: 560
#
# --smoke (or GPU_SUITE_SMOKE=1): every part with tiny sizes on the CPU, 2-4 min; the
# figures mean nothing, it checks the plumbing. GPU_SUITE_BREAK=<part> makes that part fail
# (a bogus option), GPU_SUITE_LIMIT_<part>=N sets its time limit, GPU_SUITE_ONLY="engines demo"
# runs only those parts (a rerun of what failed), GPU_SUITE_DEMO_STEPS the demo's steps (400),
# GPU_SUITE_DEMO_PRECISION its precision (fp32, as the CPU figures in the README),
# GPU_SUITE_BUDGET the overall budget in s (480), GPU_SUITE_WORK the work folder (default: a
# new one under /tmp), PYTHON the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
SMOKE=${GPU_SUITE_SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && { SMOKE=1; shift; }
OUTDIR=${1:-${OUT:-}}
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET:-480}
RESERVE=25  # seconds kept for the table, and for timeout's kill grace
WORK=${GPU_SUITE_WORK:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}
LOGS=$WORK/logs
SITE=${GPU_SUITE_SITE:-/tmp/site}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
N=0

# run_part NAME LIMIT CMD...: CMD under `timeout`, its output in $LOGS/NN_NAME.log and its exit
# code, wall time and limit in NN_NAME.status; skipped when the overall budget is spent.
run_part() {
  local name=$1 limit=$2 var="GPU_SUITE_LIMIT_$1"
  shift 2
  N=$((N + 1))
  local tag
  tag=$(printf '%02d_%s' "$N" "$name")
  limit=${!var:-$limit}
  if [[ -n "${GPU_SUITE_ONLY:-}" && $name != wheels &&
    ! " ${GPU_SUITE_ONLY//,/ } " =~ " ${name%_data} " ]]; then
    return  # not selected (demo_data goes with demo)
  fi
  local left=$((T0 + BUDGET - RESERVE - $(date +%s)))
  if ((left < 15)); then
    printf 'rc=skipped\nwhy=the suite budget (%s s) was spent\n' "$BUDGET" >"$LOGS/$tag.status"
    echo "[$name] skipped: no time left"
    return
  fi
  ((limit > left)) && limit=$left
  [[ "${GPU_SUITE_BREAK:-}" == "$name" ]] && set -- "$@" --no-such-option
  local shown="$*"
  shown=${shown//$'\n'/ }
  echo "[$name] limit ${limit}s: ${shown:0:200}"
  echo "\$ $shown" >"$LOGS/$tag.log"
  local start rc
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOGS/$tag.log" 2>&1
  rc=$?
  printf 'rc=%s\nwall=%s\nlimit=%s\n' "$rc" "$(($(date +%s) - start))" "$limit" >"$LOGS/$tag.status"
  echo "[$name] exit $rc after $(($(date +%s) - start)) s"
}

# The wheels the machine lacks (scripts/gpu_suite.py wheels), into $SITE: only where .whl exists.
# Without pip (a venv made without it) a wheel is a zip that unpacks to an importable package.
INSTALL='mapfile -t todo < <("$0" scripts/gpu_suite.py wheels .whl) && printf "%s\n" "${todo[@]}"
  if ((${#todo[@]} == 0)); then exit 0
  elif "$0" -m pip --version >/dev/null 2>&1; then
    "$0" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$1" "${todo[@]}"
  else
    echo "no pip: unzipping the wheels"
    for w in "${todo[@]}"; do "$0" -m zipfile -e "$w" "$1" || exit; done
  fi'

# --- wheels, then what this machine is --------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  run_part wheels 90 bash -c "$INSTALL" "$PY" "$SITE"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
{
  echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + working-tree changes')"
  ((SMOKE)) && echo "SMOKE RUN: tiny sizes on the CPU; the figures check the plumbing, nothing else"
  echo '```'
  echo "\$ nvidia-smi -L"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1; else echo "(no nvidia-smi)"; fi
  "$PY" - <<'EOF' 2>&1
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

where = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: cpu"
try:
    ds = version("deepspeed")
except PackageNotFoundError:
    ds = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {ds}; measured on: {where}, {torch.get_num_threads()} CPU threads")
EOF
  echo '```'
} | tee "$LOGS/header.md"
if ((!SMOKE)) && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device here: run with --smoke for the CPU check" >&2
  exit 2
fi

# --- the benchmarks -------------------------------------------------------------------------------
if ((SMOKE)); then
  TINY=(--steps 2 --batch 2 --target-frames 40 --prompt-frames 20 --phonemes 20)
  run_part train 120 "$PY" scripts/bench_train.py --size small "${TINY[@]}"
  run_part train_b32 120 "$PY" scripts/bench_train.py --size small "${TINY[@]}" --batch 4
  run_part inference 120 "$PY" scripts/bench_inference.py --size small --seconds 1 \
    --frame-rate 25
  run_part engines 180 "$PY" scripts/bench_engines.py --size tiny "${TINY[@]}" \
    --engines local,deepspeed --zero-stages 1,2
  run_part tortoise_gpt 120 "$PY" scripts/bench_unified_voice2.py --size tiny --steps 1
else
  run_part train 120 "$PY" scripts/bench_train.py --size reference --precision bf16 --steps 30
  run_part train_b32 90 "$PY" scripts/bench_train.py --size reference --precision bf16 \
    --batch 32 --steps 10
  run_part inference 150 "$PY" scripts/bench_inference.py --size reference --seconds 5
  run_part engines 210 "$PY" scripts/bench_engines.py --size reference --precision bf16 \
    --engines local,deepspeed --zero-stages 1,2
  # the seed gpt.yml's micro-batch: batch_size 128 / mega_batch_factor 4
  run_part tortoise_gpt 180 "$PY" scripts/bench_unified_voice2.py --size seed --device cuda \
    --precision bf16 --batch 32 --text 200 --codes 250 --steps 3
fi

# --- the demo -------------------------------------------------------------------------------------
# A copy of the YAML in the work folder: its relative paths (demo_data/...) then resolve there.
DEMO=$WORK/demo
mkdir -p "$DEMO/demo_data"
cp experiments/valle_demo.yml "$DEMO/"
DATA_FILES=(train.h5 heldout.h5 mel_rvq.safetensors)
if ((SMOKE)); then
  STEPS=${GPU_SUITE_DEMO_STEPS:-4}
  DEMO_OPTS=(device=cpu networks.valle.kwargs.d_model=32 networks.valle.kwargs.n_layers=1
    networks.valle.kwargs.n_heads=2 datasets.train.max_tokens=1200
    eval.evaluators.samples.num_samples=4 train.val_freq="$STEPS" eval.every="$STEPS"
    logger.print_freq=1 train.warmup_iter=1 datasets.train.n_workers=2)
  CORPUS=(--utterances 100 --speakers 2 --workers 2)
  PREP=(-o datasets.train.prepare.fit_minutes=1 -o datasets.train.prepare.fit_iters=4)
else
  STEPS=${GPU_SUITE_DEMO_STEPS:-400}
  half=$((STEPS / 2 > 0 ? STEPS / 2 : 1))
  # fp32 by default: the same arithmetic as the CPU figures in the README, to compare with them
  DEMO_OPTS=(device=cuda precision="${GPU_SUITE_DEMO_PRECISION:-fp32}" train.val_freq=$half
    eval.every=$half datasets.train.n_workers=2
    train.warmup_iter=$((STEPS / 8 < 50 ? STEPS / 8 + 1 : 50)))
  CORPUS=(--workers "$(nproc)")
  PREP=()
fi
# The smoke run always builds a 100-utterance corpus: it checks that path, and its evaluations
# (which decode every held-out reference with Griffin-Lim) stay short on a CPU.
have_data=$((!SMOKE))
for f in "${DATA_FILES[@]}"; do [[ -f experiments/demo_data/$f ]] || have_data=0; done
if ((have_data)); then
  for f in "${DATA_FILES[@]}"; do cp "experiments/demo_data/$f" "$DEMO/demo_data/"; done
  # data.h5 records the codec file by the absolute path it was prepared at (another machine)
  DEMO_OPTS+=("eval.evaluators.samples.codec_options={checkpoint: $DEMO/demo_data/mel_rvq.safetensors}")
else
  # from codebase/, where `python -m data.audio...` resolves
  run_part demo_data 240 bash -c 'cd codebase && "$0" -m data.audio.demo_corpus --out "$1" '"${CORPUS[*]}"' &&
    "$0" -m data.audio.prepare -opt "$2" '"${PREP[*]}" "$PY" "$DEMO/demo_data/corpus" "$DEMO/valle_demo.yml"
fi
OVERRIDES=()
for o in train.niter="$STEPS" path.root="$DEMO/run" logger.progress_bar=false \
  logger.stdin_commands=false logger.save_checkpoint_freq="$STEPS" "${DEMO_OPTS[@]}"; do
  OVERRIDES+=(-o "$o")
done
run_part demo 330 "$PY" codebase/train.py -opt "$DEMO/valle_demo.yml" "${OVERRIDES[@]}"

# --- the table ------------------------------------------------------------------------------------
"$PY" scripts/gpu_suite.py table "$LOGS" --demo-run "$DEMO/run" >"$LOGS/table.md" 2>"$LOGS/table.err" ||
  { echo "| table | FAILED | | $(tail -1 "$LOGS/table.err") |" >>"$LOGS/table.md"; }
{
  echo
  echo "demo: ${STEPS} steps, overrides: ${DEMO_OPTS[*]}"
  echo
  cat "$LOGS/table.md"
  echo
  echo "total wall time: $(($(date +%s) - T0)) s (budget ${BUDGET} s); logs: $LOGS"
} >"$LOGS/result.md"
echo
cat "$LOGS/result.md"
if [[ -n "$OUTDIR" ]]; then
  mkdir -p "$OUTDIR"
  cat "$LOGS/header.md" "$LOGS/result.md" >"$OUTDIR/gpu_suite.md"
  for f in "$LOGS"/*.log; do
    printf '\n===== %s (%s) =====\n' "$(basename "$f")" "$(tr '\n' ' ' <"${f%.log}.status" 2>/dev/null)"
    cat "$f"
  done >"$OUTDIR/gpu_suite_logs.txt"
  last=$(ls "$DEMO/run/samples" 2>/dev/null | sort -n | tail -1)
  [[ -n "$last" ]] && tar -czf "$OUTDIR/demo_samples.tar.gz" -C "$DEMO/run/samples" "$last"
  echo "written: $(ls "$OUTDIR" | tr '\n' ' ')"
fi
# exit 1 when a part failed or was skipped, so a caller need not read the table to know
! grep -qE '^\| [^|]+ \| (FAILED|SKIPPED) \|' "$LOGS/table.md"
