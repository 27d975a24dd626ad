#!/usr/bin/env bash
# One prepared GPU session (run on a CUDA machine from the repository root):
#   bash bench/gpu_check.sh                 # every part, logs under $OUT (default bench/out)
#   bash bench/gpu_check.sh tests speed     # only some parts
# Parts: env | tests (library tests under that machine's torch) | compile (compiled gradients ==
# eager on this GPU: bench/compile_check.py) | memory (memory layer vs titans-pytorch 0.5.5) |
# models (model benchmark, eager) | speed (memory variants with the opt-in compiled chunk step
# and chunk checkpointing) | train (colab-t4 training runs, a Markdown table at the end) |
# lesson11 (lesson 11 at full size on this GPU, stored with its outputs: needs the course extras,
# pip install -e ".[course,dev]"; the rendered notebook is copied to $OUT/11_train_lm.ipynb).
# TRAIN_VARIANTS entries are variant names; "mag+compile" trains mag with compile_chunks=true.
# Each part has its own time limit so one slow part cannot eat the others' budget; all parts
# together exceed one 600 s device call, so pick parts per call, e.g. (about 6 minutes):
#   TRAIN_STEPS=200 TRAIN_VARIANTS="transformer mag" bash bench/gpu_check.sh env compile train
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
TRAIN_STEPS="${TRAIN_STEPS:-200}"
TRAIN_VARIANTS="${TRAIN_VARIANTS:-transformer mag}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-420}"  # seconds per training run (eager MAG: ~3 min for 200 steps)
TRAIN_PRESET="${TRAIN_PRESET:-colab-t4}"
TRAIN_DEVICE="${TRAIN_DEVICE:-cuda}"  # cpu: a dry run of this part
PARTS="${*:-env tests compile memory models speed train}"

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
    compile)
      timeout 240 python3 bench/compile_check.py --device cuda 2>&1 | tee "$OUT/compile_check.txt" ;;
    memory)
      timeout 140 python3 bench/memory_bench.py --device cuda --quick 2>&1 | tee "$OUT/memory_bench_cuda.txt" ;;
    models)
      timeout 110 python3 bench/model_bench.py --device cuda --amp --presets colab-t4 \
        2>&1 | tee "$OUT/model_bench_cuda.txt" ;;
    speed)
      {
        TORCH_LOGS=recompiles timeout 190 python3 bench/model_bench.py --device cuda --amp \
          --presets colab-t4 --variants transformer mag mac --paths eager compiled
        timeout 45 python3 bench/model_bench.py --device cuda --amp --presets colab-t4 \
          --variants transformer mag --checkpoint-chunks 8
      } 2>&1 | tee "$OUT/speed_cuda.txt" ;;
    train)
      for spec in $TRAIN_VARIANTS; do
        v="${spec%%+*}"; extra=()
        [ "$spec" != "$v" ] && extra=(--set compile_chunks=true)
        start=$(date +%s)
        timeout "$TRAIN_TIMEOUT" python3 -m titans_mini.train --preset "$TRAIN_PRESET" --variant "$v" \
          --steps "$TRAIN_STEPS" --out "/tmp/run_$spec" --overwrite --device "$TRAIN_DEVICE" --no-progress \
          --eval-every "$TRAIN_STEPS" "${extra[@]}" 2>&1 | tail -4
        echo "$spec wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/train_wall.txt"
        cp "/tmp/run_$spec/metrics.jsonl" "$OUT/train_$spec.jsonl" 2>/dev/null
      done 2>&1 | tee "$OUT/train.txt"
      python3 - "$OUT" $TRAIN_VARIANTS <<'PY' | tee "$OUT/train_table.md"
import json, statistics, sys
out, specs = sys.argv[1], sys.argv[2:]
wall = dict(line.split(" wall_s ") for line in open(f"{out}/train_wall.txt").read().splitlines())
print("| run | steps done | median tokens/s | wall minutes (incl. start-up, eval) | val loss | val bits/byte |")
print("|---|---|---|---|---|---|")
for spec in specs:
    try:
        rows = [json.loads(line) for line in open(f"{out}/train_{spec}.jsonl")]
    except OSError:
        rows = []
    tps = statistics.median(r["tokens_per_s"] for r in rows) if rows else float("nan")
    val = [r for r in rows if "val_loss" in r]
    last = val[-1] if val else {}
    print(f"| {spec} | {rows[-1]['step'] if rows else 0} | {tps:,.0f} | "
          f"{int(wall.get(spec, 0)) / 60:.1f} | {last.get('val_loss', float('nan')):.3f} | "
          f"{last.get('val_bpb', float('nan')):.3f} |")
PY
      ;;
    lesson11)
      rm -rf notebooks/runs/11_train_lm
      timeout "${LESSON11_TIMEOUT:-560}" python3 -m tools.render notebooks/11_train_lm.ipynb 2>&1 \
        | tail -5 | tee "$OUT/lesson11.txt"
      cp notebooks/11_train_lm.ipynb "$OUT/11_train_lm.ipynb"
      cp -r notebooks/runs/11_train_lm "$OUT/lesson11_runs" 2>/dev/null ;;
    *) echo "unknown part $part" ;;
  esac
done
