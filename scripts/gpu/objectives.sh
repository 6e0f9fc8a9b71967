#!/usr/bin/env bash
# qpeft's preference trainer against TRL used directly, on a Llama-2-7B-shaped NF4 base (random
# weights, benchmarks/make_random_model.py), each path in its own process, alternating, same rows,
# same DPOConfig settings (benchmarks/dpo_vs_trl.py; results in docs/training.md). Needs one CUDA
# GPU, 13.5 GB of disk for the model, and the project installed with its `trl` extra.
#
#   bash scripts/gpu/objectives.sh OUTDIR
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   model        the 7B-shaped model in ASSETS/random-llama-2-7b (skipped when already built there)
#   dpo-vs-trl   OUTDIR/dpo_vs_trl_cuda.json/.md: training seconds, tokens/s and peak memory of
#                each path, qpeft's overhead in percent
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, ASSETS, TOKENIZER_SOURCE, DRY_RUN):
#   STEPS (default 30), BATCH (default 4), MAX_LENGTH (default 1024), REPEATS (default 2)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
require_files benchmarks/dpo_vs_trl.py benchmarks/make_random_model.py
require_python 1
require_embedded_model unless-tokenizer-source

stage environment gpu_environment
stage model "${MAKE_7B[@]}"
if ! passed model; then
  skip dpo-vs-trl "no model"
  exit 1
fi
stage dpo-vs-trl "$PYTHON" benchmarks/dpo_vs_trl.py --model "$MODEL_7B" --quant nf4 --grad-ckpt \
  --steps "${STEPS:-30}" --batch "${BATCH:-4}" --max-length "${MAX_LENGTH:-1024}" --repeats "${REPEATS:-2}" --out "$OUTDIR"
