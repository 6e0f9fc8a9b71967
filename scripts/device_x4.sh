#!/usr/bin/env bash
# (Since then `qpeft bench --gpus 0,1,2,3` schedules cells over the GPUs itself; this script, with
# its four `--only` shards, is what produced docs/benchmarks/h200x4_matrix/.)
# One call on a 4-GPU machine (nvidia-h100-x4): the two-GPU data-parallel test
# (tests/test_multi_gpu.py, accelerate launch) and the H100 matrix (configs/bench/h100.yaml) run
# as four shards side by side, one GPU each, then merged into one results folder and report.
# Carry .devsite (scripts/prepare_device_wheels.sh), .devtok (the embedded model's tokenizer files:
# the random models' tokenizer is cut from it, so this machine needs no GGUF) and .whl
# (liger-kernel). Resumable: a second call on the warm machine runs the cells not yet finished.
# Make .devtok here once: python -c "from qpeft.model_source import resolve_model_path as r; print(r('smollm2'))"
# names the converted embedded model; copy its tokenizer.json, tokenizer_config.json and
# chat_template.jinja into .devtok/ (or pack them: tar czf .devtok.tgz -C .devtok .).
#   BENCH_BUDGET_S=420 bash scripts/device_x4.sh
set -uo pipefail
source scripts/device_setup.sh || exit 1
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
A=runs/bench-assets R=runs/bench/h100
mkdir -p $OUT/bench
python3 benchmarks/make_random_model.py --shape tiny --dtype float32 --device cpu --out /tmp/tiny --tokenizer-source /tmp/devtok > /dev/null || exit 1
if [ -z "${SKIP_DDP:-}" ]; then
  (QPEFT_TINY_MODEL=/tmp/tiny python3 -m pytest -q -p no:cacheprovider -p no:warnings -rA tests/test_multi_gpu.py > $OUT/bench/ddp_pytest.log 2>&1
   echo "pytest rc=$?" >> $OUT/bench/ddp_pytest.log) &
  ddp=$!
fi
python3 benchmarks/make_random_model.py --shape llama-2-7b --out $A/random-llama-2-7b --tokenizer-source /tmp/devtok || exit 1
python3 benchmarks/make_long_text.py --tokenizer $A/random-llama-2-7b --min-tokens 1024 --out $A/long_text || exit 1
echo "assets ready after $(( $(date +%s) - t0 )) s"
[ -n "${ddp:-}" ] && { wait $ddp; tail -5 $OUT/bench/ddp_pytest.log; echo "ddp done after $(( $(date +%s) - t0 )) s"; }

SHARDS=("quantizer=none,trainer=hf" "quantizer=bnb-8bit,trainer=hf" "quantizer=bnb-nf4,trainer=hf" "trainer=native")
budget=$(( ${BENCH_BUDGET_S:-420} - ($(date +%s) - t0) )); [ $budget -lt 1 ] && budget=1
for i in 0 1 2 3; do
  CUDA_VISIBLE_DEVICES=$i python3 -m qpeft bench configs/bench/h100.yaml --out $R-s$i --only "${SHARDS[$i]}" \
    --stop-after $budget --no-report > $OUT/bench/shard$i.log 2>&1 &
done
wait
echo "shards done after $(( $(date +%s) - t0 )) s"
# One folder: every shard's records (each cell ran in exactly one shard) and the matrix description.
mkdir -p $R && cp $R-s0/matrix.json $R/ && cat $R-s?/results.jsonl > $R/results.jsonl
python3 -m qpeft bench report $R 2>&1 | tail -3
cp $R/results.jsonl $R/matrix.json $R/report.md $R/results.csv $OUT/bench/ 2>/dev/null
(tar czf $OUT/bench/cells.tgz runs/bench/h100-s?/cells/*/log.txt runs/bench/h100-s?/cells/*/run/summary.json 2>/dev/null)
python3 - $R <<'PY'
import json, sys
from qpeft.bench import latest_records, read_records
done = latest_records(read_records(sys.argv[1]))
print({c: (r["status"], r.get("metrics", r).get("tokens_per_s_after_warmup")) for c, r in done.items()})
PY
