#!/usr/bin/env bash
# One well-planned GPU session: tests, quickstarts on three bases (four with GPTQ), quantizer and trainer
# benchmarks. Results are packed into $OUT/results.tgz after every stage.
source scripts/device_setup.sh || exit 1
# GPTQ joins the quickstarts and the quantizer benchmark when the bundle (.devgptq.txz, carried
# in this call or an earlier one on the warm machine) imports here.
if python3 -c "import gptqmodel, optimum.gptq" > /tmp/gptq_import.log 2>&1; then GPTQ=gptq; else GPTQ=; echo "no GPTQ: $(tail -1 /tmp/gptq_import.log)"; fi
R=/tmp/res; mkdir -p $R
pack() { tar czf $OUT/results.tgz -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/nvidia.txt
python3 -m pytest -q -p no:cacheprovider -p no:warnings --durations=15 tests/ > $R/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $R/pytest_gpu.log
tail -15 $R/pytest_gpu.log; pack
for q in ${QUICKSTART_QUANTIZERS:-bnb-nf4 bnb-8bit none $GPTQ}; do
  python3 -m qpeft run configs/quickstart.yaml --set quantizer=$q --set output_dir=/tmp/qs-$q > $R/quickstart_$q.log 2>&1
  cp /tmp/qs-$q/summary.json $R/quickstart_${q}_summary.json; tail -22 $R/quickstart_$q.log | head -8
done; pack
if [ -z "${SKIP_QUANT_BENCH:-}" ]; then python3 benchmarks/quantizers.py --quantizers ${BENCH_QUANTIZERS:-none,bnb-8bit,bnb-nf4,bnb-fp4${GPTQ:+,$GPTQ}} --out $R > $R/bench_quantizers.log 2>&1; tail -6 $R/bench_quantizers.log; pack; fi
python3 benchmarks/trainers.py ${TRAINER_BENCH_ARGS:-} --out $R > $R/bench_trainers.log 2>&1; tail -10 $R/bench_trainers.log; pack
