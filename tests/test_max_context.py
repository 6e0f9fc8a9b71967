"""benchmarks/max_context.py: the search for the longest row that trains (exponential, then
within the bracket to 5%), on a memory model in-process, and the script end to end on CPU."""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from max_context import Attempt, search  # noqa: E402


def _card(limit_gib, peak):
    """An attempt function for a card of ``limit_gib``: a row trains when ``peak(T)`` fits."""
    calls = []

    def attempt(seq):
        calls.append(seq)
        p = peak(seq)
        return Attempt(seq, p <= limit_gib, None if p <= limit_gib else "oom", peak_mem_gib=p if p <= limit_gib else None)

    return attempt, calls


@pytest.mark.parametrize(
    "peak,most",
    [(lambda t: 4 + t / 4096, 6), (lambda t: 4 + t / 8192 + (t / 65536) ** 2, 8), (lambda t: 3.9 + t / 2000 + 0.3 * math.sin(t), 8)],
    ids=["linear", "quadratic", "noisy"],
)
def test_search_brackets_the_longest_row_within_5_percent(peak, most):
    attempt, calls = _card(16.0, peak)
    s = search(attempt, "p", start=4096, multiple=256, mem_limit_gib=0.97 * 16)
    truth = max(t for t in range(256, 400_000, 256) if peak(t) <= 16)  # every peak model here grows with T
    assert s.resolved and s.stopped == ""
    assert s.longest_ok <= truth < s.shortest_failed, (s.longest_ok, truth, s.shortest_failed)
    assert s.shortest_failed / s.longest_ok <= 1.05
    assert len(calls) == len(set(calls)) <= most, calls  # never the same row twice, and few processes
    assert all(t % 256 == 0 for t in calls)


def test_search_goes_down_from_a_start_that_does_not_fit():
    attempt, calls = _card(8.0, lambda t: 4 + t / 1024)
    s = search(attempt, "p", start=16384, multiple=64, mem_limit_gib=8.0)
    assert calls[:3] == [16384, 8192, 4096] and s.resolved
    assert s.longest_ok <= 4096 < s.shortest_failed and s.shortest_failed / s.longest_ok <= 1.05


def test_max_tokens_bounds_the_search_without_running_longer_rows():
    attempt, calls = _card(1e9, lambda t: 1.0)
    s = search(attempt, "p", start=64, multiple=64, max_tokens=200)
    assert calls == [64, 128] and s.longest_ok == 128 and s.resolved
    assert [a.failure for a in s.attempts if not a.ok] and all(a.failure == "capped" for a in s.attempts if not a.ok)


def test_time_budget_and_errors_stop_the_search():
    now = [0.0]

    def slow(seq):
        now[0] += 100
        return Attempt(seq, True, peak_mem_gib=1 + seq / 1e4)

    s = search(slow, "p", start=1024, multiple=64, time_budget=250, clock=lambda: now[0])
    assert not s.resolved and "time budget" in s.stopped and len(s.attempts) == 2, s
    s = search(lambda seq: Attempt(seq, False, "error", detail="ImportError: x"), "p", start=1024)
    assert not s.resolved and "ImportError" in s.stopped and s.longest_ok is None


def test_script_on_cpu_tiny_model(tiny_llama_path, tmp_path):
    """One real attempt (its own process, seed_recipe.py's qpeft-nf4 worker), the rest capped."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "max_context.py"), "--model", tiny_llama_path, "--device", "cpu"]
        + ["--paths", "qpeft-nf4,unsloth-nf4", "--start", "64", "--multiple", "64", "--max-tokens", "64", "--steps", "2"]
        + ["--out", str(tmp_path), "--tag", "t"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "max_context_t.json").read_text())
    q = report["paths"]["qpeft-nf4"]
    assert q["max_tokens"] == 64 and q["shortest_failed"] == 128 and q["resolved"]
    ran = [a for a in q["attempts"] if a["failure"] != "capped"]
    assert len(ran) == 1 and ran[0]["ok"] and ran[0]["seconds"] > 0 and ran[0]["step_seconds"] > 0
    if "skipped" in report["paths"]["unsloth-nf4"]:
        assert report["paths"]["unsloth-nf4"]["max_tokens"] is None
    assert "| qpeft-nf4 | 64 | 128 |" in (tmp_path / "max_context_t.md").read_text()
