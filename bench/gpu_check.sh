#!/usr/bin/env bash
# One prepared GPU session (run on a CUDA machine from the repository root):
#   bash bench/gpu_check.sh            # writes logs under $OUT (default bench/out)
# 1. environment table; 2. the GPU-capable library tests under that machine's torch;
# 3. memory-layer benchmark vs titans-pytorch 0.5.5; 4. model benchmark (bf16/fp16 autocast);
# 5. colab-t4 preset training runs (transformer and MAG) for a fixed number of steps.
# Each step has its own time limit so one slow step cannot eat the others' budget.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
STEPS="${STEPS:-200}"

# Wheels for the peer (titans-pytorch and its pure-Python deps) when carried in .whl/.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  nvidia-smi -L
  python3 -c "from titans_mini.device import describe; describe()"
} 2>&1 | tee "$OUT/env.txt"

echo "== library tests under this torch (no notebooks) =="
timeout 80 python3 -m pytest -q -x -p no:cacheprovider tests/test_memory.py tests/test_functional.py \
  tests/test_scan.py tests/test_attention.py tests/test_models.py tests/test_foundation.py \
  2>&1 | tail -5 | tee "$OUT/tests.txt"

echo "== memory layer benchmark =="
timeout 140 python3 bench/memory_bench.py --device cuda --quick 2>&1 | tee "$OUT/memory_bench_cuda.txt"

echo "== model benchmark =="
timeout 110 python3 bench/model_bench.py --device cuda --amp --presets colab-t4 2>&1 | tee "$OUT/model_bench_cuda.txt"

echo "== colab-t4 training, $STEPS steps =="
for v in transformer mag; do
  timeout 110 python3 -m titans_mini.train --preset colab-t4 --variant "$v" --steps "$STEPS" \
    --out "/tmp/run_$v" --device cuda --no-progress --eval-every "$STEPS" 2>&1 | tail -4
  cp "/tmp/run_$v/metrics.jsonl" "$OUT/train_$v.jsonl" 2>/dev/null
done 2>&1 | tee "$OUT/train.txt"
