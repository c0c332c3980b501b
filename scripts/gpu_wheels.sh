#!/usr/bin/env bash
# Fill .whl/ (repo root) with the wheels scripts/gpu_suite.sh installs on the GPU machine.
#
#     bash scripts/gpu_wheels.sh        # here, where pip reaches PyPI; about 20 MiB
#
# The GPU machine runs CPython 3.12 (x86-64) with torch 2.11, numpy, scipy, h5py, tensorboard,
# pyyaml, einops, msgpack, ninja, psutil, py-cpuinfo, huggingface-hub, attrs, joblib ... but has
# no network, so every other package the project imports travels as a wheel, without its
# dependencies (they are listed here one by one). Versions are the ones tested on the dev
# machine. .whl/ is ignored (.git/info/exclude) and travels only when a run names it in carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"

# Built wheels (manylinux, cp312) or pure-Python ones (py3-none-any) on PyPI.
BINARY=(
  omegaconf==2.4.0
  soundfile==0.14.0 cffi==2.0.0 pycparser==3.0            # utils/audio.py
  phonemizer==3.4.0 dlinfo==2.0.0 espeakng-loader==0.2.4  # only to build the demo data there
  vocos==0.1.0 auraloss==0.4.0 dtw-python==1.9.0
  hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4     # deepspeed's dependencies
  annotated-types==0.7.0 typing-inspection==0.4.2
  typing-extensions==4.16.0  # pydantic needs a recent one; installed there only if newer
)
# Only an sdist on PyPI: built here into a pure-Python wheel (DeepSpeed with no ops compiled:
# ZeRO 1/2 with a torch optimizer needs none).
SOURCE=(encodec==0.1.1 deepspeed==0.19.8)

# (this machine's pip config also names local indexes that lack most of these: quiet them)
pip_here() {
  python3 -m pip "$@" --disable-pip-version-check 2> >(grep -v "is ignored: it is neither" >&2)
}
for spec in "${BINARY[@]}"; do
  pip_here download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "$spec"
done
for spec in "${SOURCE[@]}"; do
  DS_BUILD_OPS=0 pip_here wheel -q --no-deps -w "$DEST" "$spec"
done

# Two versions of one package would stop the install there: refuse them here.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z "$dupes" ]] || { echo "more than one wheel of: $dupes (remove the old ones)" >&2; exit 1; }
ls -1 "$DEST"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
