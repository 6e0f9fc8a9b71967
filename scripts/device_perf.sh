#!/usr/bin/env bash
# Issue 9 on the GPU machine: the seed recipe vs qpeft (benchmarks/seed_recipe.py) on a
# Llama-2-7B-shaped random model built under /tmp (kept while the machine stays warm).
#   PATHS=recipe-nf4,qpeft-nf4 bash scripts/device_perf.sh      # then, in a next call:
#   PATHS=recipe-int8,qpeft-int8 APPEND=1 bash scripts/device_perf.sh
#   PROFILE=qpeft-nf4 bash scripts/device_perf.sh                # a torch.profiler table instead
#   PATHS=recipe-nf4,qpeft-nf4,qpeft-nf4@liger=off+optim=adamw_torch bash scripts/device_perf.sh
#                                                     # variants: trainer options after "@", joined by "+"
#   THEN_PROFILE=qpeft-nf4: after the paths, a profile of that path too
# Carry .devsite (and results of an earlier call under benchmarks/results for APPEND).
source scripts/device_setup.sh || exit 1
M=/tmp/llama7b
TOKSRC=; [ -d /tmp/devtok ] && TOKSRC="--tokenizer-source /tmp/devtok"  # no GGUF needed then
[ -f $M/random_model.json ] || python3 benchmarks/make_random_model.py --shape llama-2-7b --out $M $TOKSRC || exit 1
mkdir -p $OUT/perf
if [ -n "${PROFILE:-}" ]; then
  python3 benchmarks/seed_recipe.py --model $M --steps ${STEPS:-6} --worker "$PROFILE" --profile $OUT/perf/profile_$PROFILE.txt --result /tmp/p.json
  exit $?
fi
R=$OUT/perf; mkdir -p $R  
[ -n "${APPEND:-}" ] && [ -f benchmarks/results/seed_recipe_h100.json ] && cp benchmarks/results/seed_recipe_h100.json $R/
python3 benchmarks/seed_recipe.py --model $M --steps ${STEPS:-12} --warmup ${WARMUP:-3} --paths ${PATHS:-recipe-nf4,qpeft-nf4,recipe-int8,qpeft-int8} --out $R ${APPEND:+--append} 2>&1 | grep -v "Loading weights" | tee $R/log.txt | tail -30
if [ -n "${THEN_PROFILE:-}" ]; then
  python3 benchmarks/seed_recipe.py --model $M --steps 6 --worker "$THEN_PROFILE" --profile $R/profile.txt --result /tmp/p.json 2>&1 | tail -3
fi
ls $OUT/perf
