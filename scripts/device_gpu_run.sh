#!/usr/bin/env bash
# One well-planned GPU session: tests, quickstarts on three bases, quantizer and trainer
# benchmarks. Results are packed into $OUT/results.tgz after every stage.
source scripts/device_setup.sh || exit 1
R=/tmp/res; mkdir -p $R
pack() { tar czf $OUT/results.tgz -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/nvidia.txt
python3 -m pytest -q -p no:cacheprovider -p no:warnings --durations=15 tests/ > $R/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $R/pytest_gpu.log
tail -15 $R/pytest_gpu.log; pack
for q in ${QUICKSTART_QUANTIZERS:-bnb-nf4 bnb-8bit none}; do
  python3 -m qpeft run configs/quickstart.yaml --set quantizer=$q --set output_dir=/tmp/qs-$q > $R/quickstart_$q.log 2>&1
  cp /tmp/qs-$q/summary.json $R/quickstart_${q}_summary.json; tail -22 $R/quickstart_$q.log | head -8
done; pack
if [ -z "${SKIP_QUANT_BENCH:-}" ]; then python3 benchmarks/quantizers.py --quantizers none,bnb-8bit,bnb-nf4,bnb-fp4 --out $R > $R/bench_quantizers.log 2>&1; tail -6 $R/bench_quantizers.log; pack; fi
python3 benchmarks/trainers.py ${TRAINER_BENCH_ARGS:-} --out $R > $R/bench_trainers.log 2>&1; tail -10 $R/bench_trainers.log; pack
