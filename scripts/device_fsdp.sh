#!/usr/bin/env bash
# One call on a 2-GPU machine (nvidia-h100-x2): the two-GPU tests (tests/test_fsdp.py: FSDP2
# equals one GPU, both trainers, NF4 and no quantization; tests/test_multi_gpu.py: DDP), while the
# Llama-2-7B-shaped model is built; then that model trained with NF4 + LoRA under FSDP2 over both
# GPUs and, for comparison, on one GPU (native trainer, 4 × 1024 tokens a step, 20 steps).
# Carry .devsite and .devtok.tgz (see device_x4.sh). STAGE=tests|7b|all (default all).
set -uo pipefail
source scripts/device_setup.sh || exit 1
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s); STAGE=${STAGE:-all}
A=runs/bench-assets
mkdir -p $OUT/fsdp
python3 benchmarks/make_random_model.py --shape tiny --dtype float32 --device cpu --out /tmp/tiny --tokenizer-source /tmp/devtok > /dev/null || exit 1
if [ "$STAGE" != 7b ]; then
  (QPEFT_TINY_MODEL=/tmp/tiny python3 -m pytest -q -p no:cacheprovider -p no:warnings -rA tests/test_fsdp.py tests/test_multi_gpu.py -m gpu \
     > $OUT/fsdp/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/fsdp/pytest.log) &
  tests=$!
fi
if [ "$STAGE" != tests ]; then
  python3 benchmarks/make_random_model.py --shape llama-2-7b --out $A/random-llama-2-7b --tokenizer-source /tmp/devtok > /dev/null || exit 1
  python3 benchmarks/make_long_text.py --tokenizer $A/random-llama-2-7b --min-tokens 1024 --out $A/long_text > /dev/null || exit 1
  echo "7B assets ready after $(( $(date +%s) - t0 )) s"
fi
[ -n "${tests:-}" ] && { wait $tests; grep -E "passed|failed|PASSED|FAILED|SKIPPED|rc=" $OUT/fsdp/pytest.log | tail -20; echo "tests done after $(( $(date +%s) - t0 )) s"; }
[ "$STAGE" = tests ] && exit 0
python3 - <<'PY'
import yaml
for name, per_rank in (("fsdp2", 2), ("one", 4)):
    cfg = {"model": {"name_or_path": "runs/bench-assets/random-llama-2-7b", "device": "cuda", "dtype": "bfloat16"},
           "quantizer": "bnb-nf4", "peft": "lora",
           "trainer": {"name": "native", "options": {"batch_size": per_rank, "max_steps": 20, "lr": 1e-4, "scheduler": "constant"}},
           "data": {"path": "runs/bench-assets/long_text/train.jsonl", "val_path": "runs/bench-assets/long_text/val.jsonl",
                    "format": "text", "max_length": 1024, "max_val_examples": 8},
           "generate": {"prompt": "The quick brown fox", "max_new_tokens": 16, "chat_template": False},
           "output_dir": f"runs/fsdp7b/{name}", "seed": 0}
    open(f"runs/fsdp7b-{name}.yaml", "w").write(yaml.safe_dump(cfg))
PY
python3 -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
  --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT --fsdp_cpu_ram_efficient_loading false \
  --fsdp_activation_checkpointing false --num_machines 1 --num_processes 2 --mixed_precision no --dynamo_backend no \
  -m qpeft run runs/fsdp7b-fsdp2.yaml > $OUT/fsdp/7b_fsdp2.log 2>&1; echo "7b fsdp2 rc=$? after $(( $(date +%s) - t0 )) s"
grep -E "rank [01]: trained|validation|reloaded|error" $OUT/fsdp/7b_fsdp2.log | head
CUDA_VISIBLE_DEVICES=0 python3 -m qpeft run runs/fsdp7b-one.yaml > $OUT/fsdp/7b_one.log 2>&1; echo "7b one rc=$? after $(( $(date +%s) - t0 )) s"
grep -E "trained|validation|reloaded|error" $OUT/fsdp/7b_one.log | head
for n in fsdp2 one; do cp runs/fsdp7b/$n/summary.json $OUT/fsdp/7b_${n}_summary.json 2>/dev/null; done
