#!/usr/bin/env bash
# The seed QLoRA recipe (written plainly with transformers + peft + bitsandbytes) against qpeft,
# on a Llama-2-7B-shaped model with random weights, each path in its own process, back to back on
# one GPU (benchmarks/seed_recipe.py; results in docs/performance.md). Needs one CUDA GPU (the
# int8 recipe peaks at 12 GiB), 13.5 GB of disk for the model, and the project installed
# (pip install -e ".[all]" with a CUDA build of torch).
#
#   bash scripts/gpu/seed_recipe.sh OUTDIR
#   PATHS=recipe-nf4,qpeft-nf4,qpeft-nf4@liger=off+optim=adamw_torch bash scripts/gpu/seed_recipe.sh OUTDIR
#   PROFILE=qpeft-nf4 bash scripts/gpu/seed_recipe.sh OUTDIR     # a torch.profiler table instead
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   model        benchmarks/make_random_model.py --shape llama-2-7b into ASSETS/random-llama-2-7b
#                (6.74 B parameters, 13.5 GB; about a minute; skipped when already built there)
#   seed-recipe  benchmarks/seed_recipe.py --paths PATHS: OUTDIR/seed_recipe_<gpu>.json/.md
#                (tokens/s after warm-up, peak memory, MFU, every step's loss; written after each path)
#   profile      with PROFILE=P: only a torch.profiler kernel table of path P over PROFILE_STEPS
#                steps (default 6), OUTDIR/profile_P.txt; with THEN_PROFILE=P: the same after the paths
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, ASSETS, TOKENIZER_SOURCE, DRY_RUN):
#   PATHS    default recipe-nf4,recipe-loop-nf4,unsloth-nf4,qpeft-nf4,recipe-int8,recipe-loop-int8,qpeft-int8
#            (recipe-*: Trainer(bf16=True), the seed's recipe; recipe-loop-*: a loop under autocast;
#            unsloth-nf4 runs when unsloth imports, QPEFT_UNSLOTH_PATH adds its folder); a qpeft path may take native
#            trainer options after "@", joined by "+" (a variant measured beside the defaults)
#   BATCH, SEQ, LORA_DROPOUT   the batch shape (default 4 x 1024) and every path's LoRA dropout (default 0.05)
#   STEPS    training steps per path (default 50), WARMUP: first steps left out of the timing (default 5)
#   APPEND=1 keep the other paths of an earlier run's report in OUTDIR (same GPU model)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
require_files benchmarks/seed_recipe.py benchmarks/make_random_model.py
require_python 1
require_embedded_model unless-tokenizer-source

stage environment gpu_environment
stage model "${MAKE_7B[@]}"
if ! passed model; then
  if [ -n "${PROFILE:-}" ]; then skip profile "no model"; else skip seed-recipe "no model"; fi
  exit 1
fi

if [ -n "${PROFILE:-}" ]; then
  stage profile "$PYTHON" benchmarks/seed_recipe.py --model "$MODEL_7B" --steps "${PROFILE_STEPS:-6}" --worker "$PROFILE" \
    --profile "$OUTDIR/profile_$PROFILE.txt" --result "$OUTDIR/profile_$PROFILE.json"
  exit 0
fi

stage seed-recipe "$PYTHON" benchmarks/seed_recipe.py --model "$MODEL_7B" --steps "${STEPS:-50}" --warmup "${WARMUP:-5}" \
  --paths "${PATHS:-recipe-nf4,recipe-loop-nf4,unsloth-nf4,qpeft-nf4,recipe-int8,recipe-loop-int8,qpeft-int8}" --out "$OUTDIR" \
  ${BATCH:+--batch "$BATCH"} ${SEQ:+--seq "$SEQ"} ${LORA_DROPOUT:+--lora-dropout "$LORA_DROPOUT"} ${APPEND:+--append}

if [ -n "${THEN_PROFILE:-}" ]; then
  stage profile "$PYTHON" benchmarks/seed_recipe.py --model "$MODEL_7B" --steps "${PROFILE_STEPS:-6}" --worker "$THEN_PROFILE" \
    --profile "$OUTDIR/profile_$THEN_PROFILE.txt" --result "$OUTDIR/profile_$THEN_PROFILE.json"
fi
