#!/usr/bin/env bash
# One prepared GPU session (run on a CUDA machine from the repository root):
#   bash bench/gpu_check.sh                 # every part, logs under $OUT (default bench/out)
#   bash bench/gpu_check.sh tests speed     # only some parts
# Parts: env | tests (library tests under that machine's torch) | memory (memory layer vs
# titans-pytorch 0.5.5) | models (model benchmark, eager) | speed (memory variants with the
# opt-in compiled chunk step and chunk checkpointing) | train (colab-t4 training runs).
# Each part has its own time limit so one slow part cannot eat the others' budget.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
TRAIN_STEPS="${TRAIN_STEPS:-200}"
TRAIN_VARIANTS="${TRAIN_VARIANTS:-transformer mag}"
PARTS="${*:-env tests memory models speed train}"

# Wheels for the peer (titans-pytorch and its pure-Python deps) when carried in .whl/.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

for part in $PARTS; do
  echo "== $part =="
  case "$part" in
    env)
      { nvidia-smi -L; python3 -c "from titans_mini.device import describe; describe()"; } \
        2>&1 | tee "$OUT/env.txt" ;;
    tests)
      timeout 75 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_memory.py \
        tests/test_functional.py tests/test_scan.py tests/test_attention.py tests/test_models.py \
        tests/test_foundation.py tests/test_data.py tests/test_tasks.py tests/test_checks.py \
        2>&1 | tail -6 | tee "$OUT/tests.txt" ;;
    memory)
      timeout 140 python3 bench/memory_bench.py --device cuda --quick 2>&1 | tee "$OUT/memory_bench_cuda.txt" ;;
    models)
      timeout 110 python3 bench/model_bench.py --device cuda --amp --presets colab-t4 \
        2>&1 | tee "$OUT/model_bench_cuda.txt" ;;
    speed)
      {
        timeout 60 python3 bench/model_bench.py --device cuda --amp --presets colab-t4 \
          --variants transformer mag mac
        TORCH_LOGS=recompiles timeout 130 python3 bench/model_bench.py --device cuda --amp \
          --presets colab-t4 --variants transformer mag --compile-memory
        timeout 45 python3 bench/model_bench.py --device cuda --amp --presets colab-t4 \
          --variants transformer mag --checkpoint-chunks 8
      } 2>&1 | tee "$OUT/speed_cuda.txt" ;;
    train)
      for v in $TRAIN_VARIANTS; do
        timeout 110 python3 -m titans_mini.train --preset colab-t4 --variant "$v" \
          --steps "$TRAIN_STEPS" --out "/tmp/run_$v" --device cuda --no-progress \
          --eval-every "$TRAIN_STEPS" 2>&1 | tail -4
        cp "/tmp/run_$v/metrics.jsonl" "$OUT/train_$v.jsonl" 2>/dev/null
      done 2>&1 | tee "$OUT/train.txt" ;;
    *) echo "unknown part $part" ;;
  esac
done
