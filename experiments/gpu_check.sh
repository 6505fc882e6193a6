#!/usr/bin/env bash
# kd's train step beside the PyTorch peer on a lent GPU, in one run: every planned variant at the
# peer's three shapes, the peer first at each shape (experiments/bench_vs_peer.py), about 8
# minutes on one H100/H200. Raw JSON lines go to $OUT/bench.jsonl, the ratio tables to
# $OUT/tables.md.
#
#   experiments/gpu_wheels.sh                          # here, once: the wheels the GPU image lacks
#   experiments/gpu_check.sh                           # there (the device tool sets OUT)
#   experiments/gpu_check.sh --shape=cpu-small         # on a CPU: every variant at a small shape,
#                                                      # 1 step each, no peer (a dry run)
#
# Environment: PEER (peer_torch_kd.py; default .peer/peer_torch_kd.py, else
# ../shared/bench/peer_torch_kd.py), PEER_PYTHON (the python with torch; python3), PYTHON (kd's;
# .venv/bin/python when there is one, else python3), TIMEOUT (seconds per process; 110).
# Wheels in .whl/ (experiments/gpu_wheels.sh) are installed into /tmp/site first (not in a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."

cpu_shape=""
for arg in "$@"; do
  case "$arg" in
    --shape=*) cpu_shape="${arg#--shape=}" ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; the only one is --shape=NAME (a CPU dry run" \
            "at one bench_step.py shape, e.g. --shape=cpu-small)" >&2; exit 2 ;;
  esac
done

out="${OUT:-/tmp/kd_gpu_check}"
mkdir -p "$out" || exit 1
if [ -z "$cpu_shape" ] && compgen -G '.whl/*.whl' > /dev/null; then  # (GPU image: Python 3.12)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
peer="${PEER:-$([ -f .peer/peer_torch_kd.py ] && echo .peer/peer_torch_kd.py \
                 || echo ../shared/bench/peer_torch_kd.py)}"
timeout="${TIMEOUT:-110}"
steps=""
if [ -n "$cpu_shape" ]; then  # no CUDA for the peer: kd's variants alone, 1 timed step each
  peer="${PEER:-}"
  steps=" --steps=1"
fi

# shape, then NAME:FLAGS of bench_step.py per variant. Scanned layers compile one layer; the
# chunk sizes and dtypes are those that fit each shape's memory target on paper (bench_gpu.md);
# 'pallas' is the fused head-and-divergence kernel (config.logit_kernel), no logits array at all.
plan=(
  "1b-160m-32k|scan-256:--scan_layers --chunk_size=256|pallas:--scan_layers --logit_kernel=pallas"
  "1b-160m-152k|scan-128:--scan_layers --chunk_size=128|scan-128-bf16:--scan_layers --chunk_size=128 --student_param_dtype=bfloat16|pallas-bf16:--scan_layers --logit_kernel=pallas --student_param_dtype=bfloat16"
  "8b-1b-128k|int8-teacher:--scan_layers --chunk_size=256 --teacher_bits=8 --student_param_dtype=bfloat16 --mu_dtype=bfloat16|pallas-bf16:--scan_layers --logit_kernel=pallas --student_param_dtype=bfloat16 --mu_dtype=bfloat16"
)

status=0
start=$(date +%s)
for line in "${plan[@]}"; do
  IFS='|' read -r -a fields <<< "$line"
  shape="${cpu_shape:-${fields[0]}}"
  variants=()
  for v in "${fields[@]:1}"; do variants+=("--variant=${v}${steps}"); done
  echo "== ${fields[0]} as $shape ($(( $(date +%s) - start )) s in)" | tee -a "$out/tables.md"
  "$python" experiments/bench_vs_peer.py --peer="$peer" --peer_python="${PEER_PYTHON:-python3}" \
      --timeout="$timeout" --shapes="$shape" --out="$out/bench.jsonl" "${variants[@]}" \
      | tee -a "$out/tables.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo "gpu_check: $(( $(date +%s) - start )) s; lines in $out/bench.jsonl, tables in $out/tables.md"
exit "$status"
