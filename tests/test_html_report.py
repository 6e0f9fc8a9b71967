"""``report.html``: the bench report and a single run's report as one self-contained page each
(no network, plots embedded), loaded in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium): no console errors, and a table sorts when its header is
clicked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from qpeft import bench
from qpeft.bench import report as bench_report
from qpeft.html_report import REPORT_HTML, write_run_html

pytest.importorskip("matplotlib")

SPEEDS = {"none": 120.0, "bnb-8bit": 80.5, "bnb-nf4": 1000.25, "bnb-fp4": 95.0}


def _bench_folder(tmp_path):
    """Four hand-written cell records (no model is run) with their cell.json configs."""
    cells = [f"quantizer={q},peft=lora" for q in SPEEDS]
    (tmp_path / bench.MATRIX_FILE).write_text(json.dumps({"name": "smoke", "axes": {"quantizer": list(SPEEDS)}, "cells": cells}))
    for (q, speed), cell in zip(SPEEDS.items(), cells, strict=True):
        cell_dir = tmp_path / "cells" / f"{q}__lora"
        cell_dir.mkdir(parents=True)
        (cell_dir / "cell.json").write_text(json.dumps({"config": {"quantizer": {"name": q}, "peft": {"name": "lora"}, "seed": 7}}))
        bench.append_record(
            tmp_path,
            {
                "cell": cell,
                "labels": {"quantizer": q, "peft": "lora"},
                "status": "ok",
                "metrics": {"weight_memory_gib": speed / 1000, "tokens_per_s_after_warmup": speed, "val_perplexity_after": 20.0},
                "environment": {"cpu": "test CPU"},
                "command": "qpeft bench m.yaml",
                "log": str(cell_dir / "log.txt"),
            },
        )
    return tmp_path


def _run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {
        "quantizer": "bnb-nf4",
        "peft": "lora",
        "trainer": "hf",
        "model": "tiny",
        "stage": "complete",
        "train_steps": 3,
        "loss_history": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.25}],
        "val_perplexity_before": 30.5,
        "val_perplexity_after": 20.25,
        "weight_memory_gib": 0.1,
        "peak_rss_gib": 1.5,
        "notes": ["a <b>note</b> that must be escaped"],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "resolved_config.yaml").write_text("quantizer:\n  name: bnb-nf4\n")
    return run


def test_bench_report_html_is_self_contained(tmp_path):
    written = bench_report.write_report(_bench_folder(tmp_path))
    text = (tmp_path / REPORT_HTML).read_text()
    assert written["html"] == str(tmp_path / REPORT_HTML)
    assert text.count("data:image/png;base64,") == len(written["plots"]) >= 1
    assert not re.search(r"""(src|href)=["'](?!data:)""", text), "a reference the page would fetch"
    assert "<th>tokens/s</th>" in text and "1000.2" in text  # the Markdown report's columns
    assert text.count("seed: 7") == len(SPEEDS)  # each cell's config
    assert "<th>tokens_per_s_after_warmup</th>" in text and "<td>1000.25</td>" in text  # every recorded value
    assert not list(tmp_path.glob(".*")), "temp files left behind"


def test_run_report_html(tmp_path):
    run = _run_folder(tmp_path)
    result = subprocess.run([sys.executable, "-m", "qpeft", "report", str(run)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (run / REPORT_HTML).read_text()
    assert "data:image/png;base64," in text and "20.25" in text and "30.5" in text and "peak_rss_gib" in text
    assert "a &lt;b&gt;note&lt;/b&gt; that must be escaped" in text
    missing = subprocess.run([sys.executable, "-m", "qpeft", "report", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "has no summary.json" in missing.stderr


def _browser():
    """Headless Chromium through selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'qpeft[test]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no Chromium and chromedriver here: `apt-get install chromium chromium-driver` (make install-test does, as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _errors(browser) -> list:
    return [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def test_report_pages_in_a_real_browser(tmp_path):
    (tmp_path / "bench").mkdir()
    bench_dir = _bench_folder(tmp_path / "bench")
    bench_report.write_report(bench_dir)
    run_page = write_run_html(_run_folder(tmp_path))
    browser = _browser()
    try:
        from selenium.webdriver.common.by import By

        browser.get((bench_dir / REPORT_HTML).as_uri())
        assert _errors(browser) == []
        table = next(t for t in browser.find_elements(By.TAG_NAME, "table") if "tokens/s" in t.text)
        headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        col = headers.index("tokens/s")

        def column() -> list[str]:
            return [row.find_elements(By.TAG_NAME, "td")[col].text for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        assert [float(v) for v in column()] == [round(v, 1) for v in SPEEDS.values()]  # matrix order
        header = table.find_elements(By.CSS_SELECTOR, "thead th")[col]
        header.click()
        assert [float(v) for v in column()] == sorted(round(v, 1) for v in SPEEDS.values())  # numerically, not as text
        header.click()
        assert [float(v) for v in column()] == sorted((round(v, 1) for v in SPEEDS.values()), reverse=True)
        images = browser.find_elements(By.TAG_NAME, "img")
        assert images and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
        assert _errors(browser) == []

        browser.get(f"file://{run_page}")
        assert _errors(browser) == []
        assert browser.execute_script("return document.querySelector('img').naturalWidth") > 0
    finally:
        browser.quit()
