#!/usr/bin/env bash
# Issue 19's GPU measurements of start-up, activation offloading and max trainable context, on a
# Llama-2-7B-shaped model with random weights, each run in its own process, on one GPU (the
# first visible one). Needs one CUDA GPU with 24 GB or more, 13.5 GB of disk for the model, the
# project installed (pip install -e ".[all]" with a CUDA build of torch); unsloth only for its
# path (QPEFT_UNSLOTH_PATH, see benchmarks/seed_recipe.py). About 17 minutes on an H200 once the
# model is built (estimated: startup ~1, offload ~7, context up to 2 x 4 minutes; STAGES picks
# fewer: on 2026-12-02 the 1 x 16384 offload stage alone, three paths, took 186 s with the model's
# 37 s build).
#
#   bash scripts/gpu/perf.sh OUTDIR
#   STAGES=context MEM_CAP_GIB=24 bash scripts/gpu/perf.sh OUTDIR
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json; a summary at the end):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   model        benchmarks/make_random_model.py --shape llama-2-7b into ASSETS/random-llama-2-7b
#                (skipped when already built there)
#   startup      benchmarks/startup.py: `qpeft --help`, import, registry and `run --check` times,
#                then one `qpeft run configs/qlora_7b.yaml` of 3 steps on the model: its timeline
#                command start → imports → data → model loaded → first optimizer step done
#                (OUTDIR/startup/startup_<gpu>.json/.md; ~1 min)
#   offload      benchmarks/seed_recipe.py, paths qpeft-nf4 and qpeft-nf4@activation_offload=true at
#                4 × 1024 and at 1 × 16384 (eager, OFFLOAD_STEPS steps, the first 3 untimed): tokens/s
#                and peak memory with and without activation offloading, per-step losses; at 4 × 1024
#                also qpeft-nf4@keep_activations=auto (memory-budget mode: as many layers as fit in
#                90% of the card keep their activations; its note says how many); at 1 × 16384 also
#                qpeft-nf4@activation_offload=true+mlp_chunk=2048 (offloading and the tiled MLP), eager
#                and compiled; unsloth-nf4 at both shapes, in the same call
#                (OUTDIR/offload/seed_recipe_<gpu>[_1x16384].json/.md; ~4 min)
#   context      benchmarks/max_context.py: the longest batch-1 row that trains (2 optimizer steps,
#                each attempt in its own process, to 5%) for CONTEXT_PATHS, PyTorch's allocator
#                capped at MEM_CAP_GIB (a card of that size emulated, so the search stays short),
#                at most CONTEXT_BUDGET seconds per path (OUTDIR/context/max_context_<gpu>_cap*.json/.md)
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, ASSETS, TOKENIZER_SOURCE, DRY_RUN):
#   STAGES          default "startup offload context"
#   OFFLOAD_STEPS   default 8
#   OFFLOAD_SHAPES  default "4x1024 1x16384"; OFFLOAD_PATHS_4x1024, OFFLOAD_PATHS_1x16384: the paths of
#                   benchmarks/seed_recipe.py at each shape (defaults above, with compile=true at
#                   1 x 16384 and unsloth-nf4 at both, recorded as skipped when unsloth does not import)
#   CONTEXT_PATHS   default qpeft-nf4@activation_offload=true+mlp_chunk=2048,unsloth-nf4 (unsloth-nf4 is
#                   recorded as skipped when unsloth does not import; add qpeft-nf4@activation_offload=true
#                   for offloading alone, measured at the 12 GiB cap on 2026-12-02: >= 23,040 tokens)
#   MEM_CAP_GIB     default 12; CONTEXT_BUDGET default 240 (seconds per path: each unsloth attempt spends
#                   about a minute importing and patching); CONTEXT_START default 16384
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
require_files benchmarks/startup.py benchmarks/seed_recipe.py benchmarks/max_context.py benchmarks/make_random_model.py configs/qlora_7b.yaml
require_python 1
require_embedded_model unless-tokenizer-source

STAGES=${STAGES:-startup offload context}
wants() { [[ " $STAGES " == *" $1 "* ]]; }

stage environment gpu_environment
stage model "${MAKE_7B[@]}"
if ! passed model; then
  for s in $STAGES; do skip "$s" "no model"; done
  exit 1
fi

if wants startup; then
  stage startup "$PYTHON" benchmarks/startup.py --repeat 3 --out "$OUTDIR/startup" --config configs/qlora_7b.yaml \
    --set "model.name_or_path=$MODEL_7B" --set trainer.options.max_steps=3 --set trainer.options.save_steps=null --set trainer.options.warmup_steps=0 \
    --set evaluate=false --set generate.max_new_tokens=8 --set "output_dir=$OUTDIR/startup/run"
fi

if wants offload; then
  for shape in ${OFFLOAD_SHAPES:-4x1024 1x16384}; do
    if [ "$shape" = 4x1024 ]; then
      stage offload-4x1024 "$PYTHON" benchmarks/seed_recipe.py --model "$MODEL_7B" --steps "${OFFLOAD_STEPS:-8}" --warmup 3 \
        --lora-dropout 0 --paths "${OFFLOAD_PATHS_4x1024:-qpeft-nf4,qpeft-nf4@activation_offload=true,qpeft-nf4@keep_activations=auto,unsloth-nf4}" \
        --out "$OUTDIR/offload"
    else
      stage offload-1x16384 "$PYTHON" benchmarks/seed_recipe.py --model "$MODEL_7B" --steps "${OFFLOAD_STEPS:-8}" --warmup 3 \
        --lora-dropout 0 --batch 1 --seq 16384 --out "$OUTDIR/offload" \
        --paths "${OFFLOAD_PATHS_1x16384:-qpeft-nf4,qpeft-nf4@activation_offload=true,qpeft-nf4@activation_offload=true+mlp_chunk=2048,qpeft-nf4@activation_offload=true+mlp_chunk=2048+compile=true,unsloth-nf4}"
    fi
  done
fi

if wants context; then
  stage context "$PYTHON" benchmarks/max_context.py --model "$MODEL_7B" \
    --paths "${CONTEXT_PATHS:-qpeft-nf4@activation_offload=true+mlp_chunk=2048,unsloth-nf4}" \
    --mem-cap-gib "${MEM_CAP_GIB:-12}" --time-budget "${CONTEXT_BUDGET:-240}" --start "${CONTEXT_START:-16384}" --out "$OUTDIR/context"
fi

# One place to read the results from.
if [ -z "${DRY_RUN:-}" ]; then
  echo
  echo "== results"
  for f in "$OUTDIR"/startup/startup_*.md "$OUTDIR"/offload/seed_recipe_*.md "$OUTDIR"/context/max_context_*.md; do
    [ -f "$f" ] && { echo "--- $f"; cat "$f"; }
  done
fi
