#!/usr/bin/env bash
# Downloads into .whl/ the wheels (Python 3.12, x86-64 Linux) of the packages kd imports that the
# lent GPU machines' image lacks, at the versions of this checkout's .venv, and copies the PyTorch
# peer to .peer/; experiments/gpu_check.sh installs them there. Needs pip's registry, not a GPU.
#   experiments/gpu_wheels.sh && du -sh .whl      # then carry .whl and .peer in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.peer/' .git/info/exclude 2>/dev/null || echo '/.peer/' >> .git/info/exclude
mkdir -p .whl .peer
cp ../shared/bench/peer_torch_kd.py .peer/ 2>/dev/null || echo 'no ../shared/bench/peer_torch_kd.py;' \
    'set PEER on the GPU machine' >&2
# The image has jax, flax, optax, orbax, transformers, torch (KINDS.md's package list), not these.
names=(ml_collections qwix grain array_record immutabledict tensorflow_datasets
       tensorflow_metadata promise toml portpicker dm_tree gguf simple_parsing docstring_parser
       termcolor)
python=.venv/bin/python
specs=()
for n in "${names[@]}"; do
  v=$("$python" -m pip show "$n" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "gpu_wheels: $n is not in .venv; run make install first" >&2; exit 1; }
  specs+=("$n==$v")
done
for spec in "${specs[@]}"; do  # one at a time: a pure-Python sdist (promise) is built here
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$spec" 2>/dev/null \
    || "$python" -m pip wheel -q --no-deps -w .whl "$spec" 2>/dev/null \
    || { echo "gpu_wheels: no wheel for $spec" >&2; exit 1; }
done
ls .whl
