#!/usr/bin/env bash
# The quality matrix on one GPU: every quantizer × LoRA on the embedded SmolLM2-135M-Instruct,
# evaluated before and after training with perplexity and the shipped lm-eval smoke task
# (configs/bench/quality_gpu.yaml), then its report (report.md, report.html, the Pareto plots).
# Needs one CUDA GPU and the project installed with its extras (gptq and awq cells refuse, naming
# the missing package, where gptqmodel is not installed).
#
#   bash scripts/gpu/quality.sh OUTDIR
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   matrix       qpeft bench configs/bench/quality_gpu.yaml into OUTDIR/quality (run again to resume)
#   report       qpeft bench report OUTDIR/quality
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, DRY_RUN):
#   ONLY     cells to run (qpeft bench --only), space-separated
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
require_files configs/bench/quality_gpu.yaml
require_python 1
require_embedded_model

stage environment gpu_environment
bench_args=(--out "$OUTDIR/quality" --no-report)
for sel in ${ONLY:-}; do bench_args+=(--only "$sel"); done
stage matrix "$PYTHON" -m qpeft bench configs/bench/quality_gpu.yaml "${bench_args[@]}"
if [ -n "${DRY_RUN:-}" ] || [ -f "$OUTDIR/quality/results.jsonl" ]; then
  stage report "$PYTHON" -m qpeft bench report "$OUTDIR/quality"
else
  skip report "no results"
fi
