"""Self-contained HTML reports: ``report.html`` of a bench results folder (``qpeft bench report
DIR``) and of a single run (``qpeft report RUN_DIR``).

One file each, opened from disk with no network: styles and the table-sorting script are
inline, plots are PNGs embedded as ``data:`` URIs, and a Content-Security-Policy forbids any
other source. The bench page is the Markdown report rendered (markdown-it-py, which rich
already depends on), so every column and section ``report.md`` has is in it, plus each cell's
config. Every table sorts by a column when its header is clicked (numbers by value, cells
without a number last).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import yaml

from .io import atomic_write_text

REPORT_HTML = "report.html"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2;cursor:pointer;user-select:none;white-space:nowrap}
th[data-sort=asc]::after{content:" \\25B2"} th[data-sort=desc]::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}
code{font-size:12px} img{max-width:100%} details{margin:.3em 0}
"""

_SORT_JS = """
(function () {
  function num(text) {
    var m = text.trim().replace(/,/g, "").match(/^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?/i);
    return m ? parseFloat(m[0]) : null;
  }
  function sortBy(table, col, th) {
    var asc = th.getAttribute("data-sort") !== "asc";
    Array.prototype.forEach.call(table.querySelectorAll("th"), function (h) { h.removeAttribute("data-sort"); });
    th.setAttribute("data-sort", asc ? "asc" : "desc");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col] ? a.cells[col].textContent : "", y = b.cells[col] ? b.cells[col].textContent : "";
      var nx = num(x), ny = num(y);
      if (nx !== null && ny === null) return -1;  // cells without a number stay last
      if (nx === null && ny !== null) return 1;
      var c = nx !== null ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table"), function (table) {
    if (!table.tBodies.length) return;
    Array.prototype.forEach.call(table.querySelectorAll("thead th"), function (th, col) {
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
})();
"""

# No network: only inline styles and scripts, and images from data: URIs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def page(title: str, body: str) -> str:
    """A whole HTML document around ``body``: inline styles, the sorting script, no network."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<link rel='icon' href='data:,'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        f"<script>{_SORT_JS}</script>\n</body></html>\n"
    )


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def markdown_html(text: str, directory: Path) -> str:
    """Markdown (qpeft's reports: headings, tables, lists, code, images) as HTML; images that
    are PNG files in ``directory`` are embedded, raw HTML in the text is escaped."""
    from markdown_it import MarkdownIt

    out = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)

    def embed(m: re.Match) -> str:
        src = html.unescape(m.group(1))
        path = directory / src
        if "/" not in src and src.endswith(".png") and path.is_file():
            return f'src="{png_data_uri(path)}"'
        return 'src=""'  # never a reference the page would fetch

    return re.sub(r'src="([^"]*)"', embed, out)


def _cell_config(row: dict) -> dict | None:
    """The run config of a bench cell (``cells/<slug>/cell.json`` beside its log)."""
    log = row.get("log")
    if not log:
        return None
    spec = Path(log).parent / "cell.json"
    try:
        return json.loads(spec.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _all_metrics(meta: dict, rows: list[dict]) -> str:
    """Every column of ``results.csv`` that some cell has a value in, as one sortable table
    (folded): each metric any cell recorded, whether or not the Markdown table shows it."""
    import csv
    import io

    from .bench.report import csv_text

    table = list(csv.reader(io.StringIO(csv_text(meta, rows))))
    if len(table) < 2:
        return ""
    keep = [i for i in range(len(table[0])) if any(r[i] for r in table[1:] if i < len(r))]
    header = [table[0][i] for i in keep]
    body = [[r[i] if i < len(r) else "" for i in keep] for r in table[1:]]
    return "<details><summary>Every recorded value (results.csv)</summary>" + _table(header, body) + "</details>"


def bench_html(meta: dict, rows: list[dict], markdown_text: str, directory: Path) -> str:
    """The bench report page: ``report.md`` rendered, then each cell's config."""
    parts = [markdown_html(markdown_text, directory), _all_metrics(meta, rows), "<h2>Cell configs</h2>"]
    for r in rows:
        config = _cell_config(r)
        shown = yaml.safe_dump(config, sort_keys=False) if config else json.dumps(r.get("overrides") or {}, indent=2)
        what = "run config" if config else "overrides of the matrix's base"
        parts.append(
            f"<details><summary>{html.escape(r['cell'])} ({html.escape(str(r.get('status', '')))}, {what})</summary>"
            f"<pre>{html.escape(shown)}</pre></details>"
        )
    name = meta.get("name") or (rows[0].get("matrix") if rows else "") or directory.name
    return page(f"qpeft bench: {name}", "\n".join(parts))


def write_bench_html(meta: dict, rows: list[dict], markdown_text: str, directory: str | Path) -> str:
    """Write ``report.html`` into a bench results folder (atomically); return its path."""
    directory = Path(directory)
    atomic_write_text(directory / REPORT_HTML, bench_html(meta, rows, markdown_text, directory))
    return str(directory / REPORT_HTML)


# ---------------------------------------------------------------------------- one run


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _loss_plot(history: list[dict]) -> str | None:
    """The training loss per step as a PNG data URI (None without matplotlib or points)."""
    points = [(h["step"], h["loss"]) for h in history if h.get("step") is not None and h.get("loss") is not None]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    from matplotlib.ticker import MaxNLocator

    ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def run_html(run_dir: Path) -> str:
    """The page of one run folder: backends, loss curve, evaluation results, memory and speed,
    notes, generation, every summary value and the resolved config."""
    from .errors import QpeftError
    from .tracking import flatten

    path = run_dir / "summary.json"
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QpeftError(f"{run_dir} has no summary.json: name the output_dir of a `qpeft run`") from None
    except ValueError as exc:
        raise QpeftError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(s, dict):
        raise QpeftError(f"{path} is not a run summary (a JSON object)")
    e = html.escape
    title = f"qpeft run: {s.get('quantizer')} + {s.get('peft')} + {s.get('trainer')} on {s.get('model')}"
    parts = [f"<h1>{e(title)}</h1>", f"<p>{e(str(run_dir))}; stage {e(str(s.get('stage')))}; run id {e(str(s.get('run_id')))}</p>"]

    parts.append("<h2>Training loss</h2>")
    plot = _loss_plot(s.get("loss_history") or [])
    parts.append(f"<img alt='training loss per step' src='{plot}'>" if plot else "<p>(no loss plot: no logged steps, or no matplotlib)</p>")
    history = s.get("loss_history") or []
    if history:
        parts.append(_table(["step", "loss"], [[h.get("step"), h.get("loss")] for h in history]))

    parts.append("<h2>Evaluation</h2>")
    rows = []
    for metric in ("val_perplexity", "val_loss"):
        if s.get(f"{metric}_before") is not None or s.get(f"{metric}_after") is not None:
            rows.append([metric, s.get(f"{metric}_before"), s.get(f"{metric}_after")])
    parts.append(_table(["metric", "before training", "after training"], rows) if rows else "<p>(not evaluated)</p>")
    for key in [k for k in s if k == "eval" or k.startswith("eval_")]:  # evaluator results, whatever their layout
        flat = flatten(s[key])
        parts.append(f"<h3>{e(key)}</h3>" + _table(["result", "value"], [[k, v] for k, v in flat.items()]))

    parts.append("<h2>Memory and speed</h2>")
    keys = ["weight_memory_gib", "bits", "load_seconds", "train_seconds", "tokens_per_s", "tokens_per_s_after_warmup"]
    keys += [k for k in s if k.startswith("peak_")]
    parts.append(_table(["measure", "value"], [[k, s[k]] for k in keys if k in s]))

    parts.append("<h2>Notes</h2>")
    notes = s.get("notes") or []
    parts.append("<ul>" + "".join(f"<li>{e(str(n))}</li>" for n in notes) + "</ul>" if notes else "<p>(none)</p>")
    gen = s.get("generation")
    if isinstance(gen, dict):
        parts.append("<h2>Generation</h2>" + _table(["", ""], [[k, v] for k, v in gen.items()]))
    trackers = [p for p in ("tensorboard", "mlflow.db", "wandb") if (run_dir / p).exists()]
    if trackers:
        parts.append("<h2>Trackers</h2><ul>" + "".join(f"<li>{e(str(run_dir / p))}</li>" for p in trackers) + "</ul>")

    parts.append("<h2>Summary</h2>")
    flat = {k: v for k, v in flatten({k: v for k, v in s.items() if k not in ("loss_history", "notes")}).items()}
    parts.append(_table(["key", "value"], [[k, v] for k, v in flat.items()]))
    config = run_dir / "resolved_config.yaml"
    if config.is_file():
        parts.append(f"<h2>Resolved config</h2><pre>{e(config.read_text(encoding='utf-8'))}</pre>")
    return page(title, "\n".join(parts))


def write_run_html(run_dir: str | Path) -> str:
    """Write ``report.html`` into a run's output folder (atomically); return its path."""
    run_dir = Path(run_dir)
    text = run_html(run_dir)
    atomic_write_text(run_dir / REPORT_HTML, text)
    return str(run_dir / REPORT_HTML)
