"""What a command prints besides its own lines: library noise shown once or filtered
(qpeft.quiet), gptqmodel imported only by GPTQ runs, plain progress lines when piped and no
line broken at the console's width (qpeft.progress), OMP_WAIT_POLICY for CPU runs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from conftest import REPO
from rich.console import Console

#: Lines the libraries print on their own that no qpeft command may show (see qpeft.quiet).
NOISE = ("GPT-QModel", "Python GIL is enabled", "Auto setting PYTORCH_ALLOC_CONF", "_pytree.py", "kernels-community")


def _qpeft(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80", **(env or {})}
    env.pop("QPEFT_PROGRESS_SECONDS", None)
    return subprocess.run(
        [sys.executable, "-m", "qpeft", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_quiet(text: str) -> None:
    for noise in NOISE:
        assert noise not in text, f"{noise!r} printed:\n{text}"


def test_check_and_plugins_print_no_library_noise():
    check = _qpeft("run", "configs/quickstart.yaml", "--check")
    assert check.returncode == 0, check.stderr
    assert "config ok" in check.stdout
    _assert_quiet(check.stdout + check.stderr)
    listing = _qpeft("plugins")
    assert listing.returncode == 0, listing.stderr
    assert "gptq" in listing.stdout
    _assert_quiet(listing.stdout + listing.stderr)


def _write_config(tiny_config, tmp_path, **overrides) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**overrides)))
    return str(path)


TIMESTAMPED = re.compile(r"^ *\d+\.\ds \S")


def test_piped_run_logs_steps_and_breaks_no_line(tiny_config, tmp_path):
    """quantizer none, 12 steps, stdout and stderr piped at 80 columns: a plain line per tenth of
    the run, every line of the log whole (each starts with its timestamp), no library noise,
    and no line twice."""
    cfg = _write_config(
        tiny_config,
        tmp_path,
        quantizer={"name": "none"},
        trainer={"name": "hf", "options": {"batch_size": 4, "max_steps": 12, "lr": 3e-3, "scheduler": "constant"}},
    )
    proc = _qpeft("run", cfg)
    assert proc.returncode == 0, proc.stderr
    _assert_quiet(proc.stdout + proc.stderr)
    log = proc.stderr.splitlines()
    steps = [line for line in log if re.match(r"^ *\d+\.\ds step \d+/12 loss \d+\.\d{4}", line)]
    assert [int(re.search(r"step (\d+)/", s).group(1)) for s in steps] == [1, 2, 4, 6, 8, 10, 12], proc.stderr
    assert all("tok/s" in s for s in steps[1:]) and all("eta" in s for s in steps[1:-1])
    # Long lines (the data lines name a token store path; the reload line ends in its Δlogit)
    # are longer than 80 columns and stay whole.
    assert any(len(line) > 80 for line in log)
    assert next(line for line in log if "max |Δlogit| vs trained model = " in line).endswith("e+00")
    broken = [line for line in log if line.strip() and not TIMESTAMPED.match(line)]
    assert not broken, f"lines not starting with a timestamp (a wrapped line?): {broken}\n{proc.stderr}"
    repeated = [line for line, n in Counter(log).items() if n > 1]
    assert not repeated, repeated
    assert "qpeft run summary" in proc.stdout


@pytest.mark.filterwarnings("ignore")
def test_bnb_8bit_cast_notice_is_shown_once(tiny_config, tmp_path):
    """bitsandbytes logs its float16 cast on every 8-bit matmul of a float32 run (10,003 lines in
    5 steps; a bfloat16 run on a GPU casts nothing and logs nothing, so this runs on the CPU)."""
    cfg = _write_config(
        tiny_config,
        tmp_path,
        model={"name_or_path": tiny_config()["model"]["name_or_path"], "device": "cpu", "dtype": "float32"},
        quantizer={"name": "bnb-8bit"},
        trainer={"name": "hf", "options": {"batch_size": 4, "max_steps": 2, "lr": 3e-3, "scheduler": "constant"}},
        generate={"max_new_tokens": 2},
    )
    proc = _qpeft("run", cfg)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("MatMul8bitLt: inputs will be cast") == 1, proc.stderr
    _assert_quiet(proc.stdout + proc.stderr)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_gptqmodel_is_deferred_until_the_gptq_quantizer_needs_it():
    """While deferred, peft and transformers see no gptqmodel (so a LoRA dispatch on a plain
    model does not import it); the gptq quantizer's check makes it importable again, with the
    libraries' cached answers forgotten."""
    pytest.importorskip("gptqmodel")
    code = """
import sys
from qpeft.cli import main  # noqa: F401  (what `python -m qpeft` imports first)
from qpeft.quiet import defer_gptqmodel
assert defer_gptqmodel()
import torch, peft
from peft.import_utils import is_gptqmodel_available
from transformers.utils.import_utils import is_gptqmodel_available as hf_available
from peft.utils.other import is_gptqmodel_quant_linear
assert not is_gptqmodel_quant_linear(torch.nn.Linear(2, 2)) and not is_gptqmodel_available() and not hf_available()
assert sys.modules["gptqmodel"] is None
from qpeft.registry import load_registry
from qpeft.context import RunContext
gptq = load_registry().get("quantizer", "gptq")
gptq.check(gptq.Options(), RunContext(config=None, device="cpu", dtype="float32", output_dir="."))
assert is_gptqmodel_available() and hf_available()
from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # noqa: F401
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_omp_wait_policy_is_set_only_when_it_can_take_effect():
    from qpeft.quiet import set_omp_wait_policy

    env: dict = {}
    expected = not os.path.exists("/dev/nvidiactl") and "torch" not in sys.modules
    assert set_omp_wait_policy(env) is expected
    assert env == ({"OMP_WAIT_POLICY": "PASSIVE"} if expected else {})
    user = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_omp_wait_policy(user) is False and user == {"OMP_WAIT_POLICY": "ACTIVE"}
    # The command line's modules do not load torch, so main() sets it before OpenMP starts.
    proc = _python("import sys, qpeft.cli; print('torch' in sys.modules)")
    assert proc.stdout.strip() == "False", proc.stderr


def test_step_lines_cadence_without_a_terminal(monkeypatch):
    """Piped: the first and last step, every tenth of the run, and every QPEFT_PROGRESS_SECONDS."""
    from qpeft.progress import TrainingProgress

    def lines(every: str | None, max_steps: int) -> list[int]:
        if every is None:
            monkeypatch.delenv("QPEFT_PROGRESS_SECONDS", raising=False)
        else:
            monkeypatch.setenv("QPEFT_PROGRESS_SECONDS", every)
        buf = io.StringIO()
        display = TrainingProgress(Console(file=buf, width=20, force_terminal=False))
        for step in range(1, max_steps + 1):
            display.qpeft_on_step_end(step=step, max_steps=max_steps, logs={"loss": 1.0, "tokens": 100 * step}, ctx=None)
        display.close()
        text = buf.getvalue()
        assert all(len(line) > 20 for line in text.splitlines())  # wider than the console, unbroken
        return [int(m) for m in re.findall(r"step (\d+)/", text)]

    assert lines(None, 25) == [1, 3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert lines(None, 3) == [1, 2, 3]
    assert lines("0", 25) == list(range(1, 26))
