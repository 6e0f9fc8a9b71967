#!/usr/bin/env bash
# qpeft bench on the GPU machine: the H100 matrix (configs/bench/h100.yaml) on a Llama-2-7B-shaped
# model with random weights built here (no hub), batch 4 × 1024 tokens; then, with STAGE=overhead
# (or all), the overhead benchmark (a qpeft cell vs a plain transformers+peft+bitsandbytes script).
#
# Carry what scripts/device_gpu_run.sh carries (.devsite from scripts/prepare_device_wheels.sh and
# the GGUF parts). A call has 10 minutes, the matrix needs about 30: each call starts no new cell
# after BENCH_BUDGET_S seconds (default 380) and the next call on the same warm machine resumes
# (runs/ is kept between calls; finished cells are skipped). Every call copies the results to
# $OUT/bench (results.jsonl, matrix.json, report.md, results.csv, cells.tgz with each cell's log
# and summary); render the plots here with `qpeft bench report <that folder>`.
#
# device_setup.sh runs only with QPEFT_DEVICE_OK=1 set (the lead engineer's GPU budget).
#   QPEFT_DEVICE_OK=1 bash scripts/device_bench.sh                 # the matrix, resumable
#   BENCH_ONLY="quantizer=bnb-nf4" bash scripts/device_bench.sh    # a --only selector (space-separated list)
#   STAGE=overhead bash scripts/device_bench.sh                    # the overhead benchmark (~7 min)
# Set QPEFT_COMMIT=<local HEAD> in the command: the machine's copy of .git may lag the files.
set -uo pipefail
source scripts/device_setup.sh || exit 1   # also puts this checkout's qpeft first on PYTHONPATH
python3 -c "import qpeft.bench; print('qpeft from', qpeft.bench.__file__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
A=runs/bench-assets R=runs/bench/h100
TOK=(); [ -f /tmp/devtok/tokenizer.json ] && TOK=(--tokenizer-source /tmp/devtok)   # no GGUF needed then
python3 benchmarks/make_random_model.py --shape llama-2-7b --out $A/random-llama-2-7b "${TOK[@]}" || exit 1
python3 benchmarks/make_long_text.py --tokenizer $A/random-llama-2-7b --min-tokens 1024 --out $A/long_text || exit 1
echo "assets ready after $(( $(date +%s) - t0 )) s"; du -sh $A/* 2>/dev/null; df -h . | tail -1

STAGE=${STAGE:-bench}
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  ONLY=(); for s in ${BENCH_ONLY:-}; do ONLY+=(--only "$s"); done
  budget=$(( ${BENCH_BUDGET_S:-380} - ($(date +%s) - t0) )); [ $budget -lt 1 ] && budget=1
  python3 -m qpeft bench configs/bench/h100.yaml --out $R --stop-after $budget "${ONLY[@]}" --no-report 2>&1 | tail -40
  python3 -m qpeft bench report $R 2>&1 | tail -3   # Markdown + CSV here; the plots where matplotlib is
  mkdir -p $OUT/bench
  cp $R/results.jsonl $R/matrix.json $R/report.md $R/results.csv $OUT/bench/ 2>/dev/null
  cp $R/*.png $OUT/bench/ 2>/dev/null
  (cd $R && tar czf $OUT/bench/cells.tgz cells/*/log.txt cells/*/run/summary.json cells/*/run/resolved_config.yaml 2>/dev/null)
  python3 - $R <<'PY'
import json, sys
from qpeft.bench import latest_records, read_records
done = latest_records(read_records(sys.argv[1]))
print(f"{sum(r['status'] == 'ok' for r in done.values())} ok, {sum(r['status'] == 'failed' for r in done.values())} failed, "
      f"{sum(r['status'] == 'unsupported' for r in done.values())} not supported, of 12 cells")
PY
fi
if [ "$STAGE" = overhead ] || [ "$STAGE" = all ]; then
  python3 benchmarks/bench_overhead.py --model $A/random-llama-2-7b --steps 20 --batch 4 --max-length 1024 --repeats 2 \
    --grad-ckpt --out $OUT/overhead 2>&1 | grep -v Warning | tail -12
fi
