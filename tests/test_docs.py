"""The docs stay true: every relative link in README.md and docs/**/*.md points at a file that
exists (and at a heading that exists, by GitHub's heading anchors), and every ``qpeft ...``
command in a ``bash``/``console`` code block parses: its options and arguments go through the
CLI's own parser, each subcommand's ``--help`` works, and a ``qpeft run`` of a config file in the
repository passes ``--check``. The CLI work happens in one child process (a few seconds)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _without_code(text: str) -> str:
    """The Markdown text with fenced code blocks blanked (line numbers kept) and inline code removed."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (Markdown links and code marks dropped), lower
    case, punctuation other than ``-`` and ``_`` removed, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_" or ch == " " or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set(EXPLICIT_ANCHOR.findall(text))
    for m in HEADING.finditer(text):
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in the file that is not a URL with a scheme."""
    text = _without_code(path.read_text(encoding="utf-8"))
    out = []
    for pattern in (LINK, REF_LINK):
        for m in pattern.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                continue  # https:, mailto:, ...
            out.append((text.count("\n", 0, m.start()) + 1, target))
    return out


def link_problems(docs: list[Path]) -> list[str]:
    problems = []
    for doc in docs:
        for line, target in relative_links(doc):
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{_rel(doc)}:{line}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no such file")
                continue
            if doc.is_relative_to(REPO) and not dest.is_relative_to(REPO):
                problems.append(f"{where}: points outside the repository")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {_rel(dest)}")
    return problems


def test_every_relative_link_resolves():
    problems = link_problems(DOCS)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_no_reference_to_files_outside_the_repository():
    """The design notes once lived outside the repository; what the code and docs need of them
    is in docs/architecture.md ("Library facts")."""
    name = "DESIGN" + ".md"
    listed = subprocess.run(["git", "ls-files", "--", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True)
    files = [REPO / f for f in listed.stdout.split()] if listed.returncode == 0 else [*DOCS, *REPO.glob("[cpt]*/**/*.py")]
    hits = [_rel(f) for f in files if f.is_file() and name in f.read_text(encoding="utf-8", errors="replace")]
    assert not hits, f"{name} is not in the repository; point these at docs/architecture.md: {hits}"


# ---------------------------------------------------------------------------- commands


def qpeft_commands(docs: list[Path] = DOCS) -> list[tuple[str, list[str]]]:
    """(where, the arguments after ``qpeft``) of every qpeft command in a bash/console block of
    README.md and docs/**/*.md; continuation lines joined, comments and ``$`` prompts dropped."""
    commands = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            lang = block.group("info").strip().split(" ")[0].lower()
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            first = text.count("\n", 0, block.start("body")) + 1
            lines = textwrap.dedent(block.group("body")).split("\n")
            joined: list[tuple[int, str]] = []
            for n, line in enumerate(lines):
                if joined and joined[-1][1].endswith("\\"):
                    joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
                else:
                    joined.append((first + n, line.strip()))
            for n, line in joined:
                if lang == "console":
                    if not line.startswith("$ "):
                        continue  # output, not a command
                    line = line[2:]
                try:
                    words = shlex.split(line, comments=True)
                except ValueError as exc:
                    commands.append((f"{_rel(doc)}:{n}", ["<unparsable shell line>", str(exc)]))
                    continue
                if "qpeft" not in words:
                    continue
                where = f"{_rel(doc)}:{n}: {line.split(' #')[0].strip()}"
                if "..." in words or "…" in words:
                    commands.append((where, ["<literal ... in the command>"]))
                    continue
                commands.append((where, words[words.index("qpeft") + 1 :]))
    return commands


# The child process: for every distinct subcommand its --help; for every command a parse by the
# CLI's own click parser (options, arguments and their types; nothing runs); `run --check` for
# runs of a config file in the repository.
CHILD = r"""
import json, os, sys
import typer
from typer.testing import CliRunner
from qpeft.cli import app

jobs = json.loads(sys.stdin.read())
root = typer.main.get_command(app)
runner = CliRunner()
env = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}


def resolve(args):
    path, cmd, rest = [], root, list(args)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest[0]
        if name in cmd.commands:
            rest.pop(0)
        elif "run" in cmd.commands and path == ["bench"]:
            name = "run"  # qpeft bench MATRIX is qpeft bench run MATRIX
        else:
            break
        path.append(name)
        cmd = cmd.commands[name]
    return path, cmd, rest


out = {"help": {}, "parse": [], "check": []}
for args in jobs["commands"]:
    path, cmd, rest = resolve(args)
    key = " ".join(path)
    if key not in out["help"]:
        r = runner.invoke(app, [*path, "--help"], env=env)
        out["help"][key] = [r.exit_code, r.output[-2000:]]
    if hasattr(cmd, "commands"):  # a group (typer may bring its own copy of click: no isinstance)
        err = f"no subcommand given or unknown subcommand {rest[:1]}; valid: {sorted(cmd.commands)}"
    else:
        try:
            with cmd.make_context(" ".join(["qpeft", *path]), list(rest)) as ctx:
                pass
            err = None
        except Exception as exc:  # click's UsageError and its kinds; Exit (from an eager option) is fine
            if type(exc).__name__ == "Exit":
                err = None
            elif hasattr(exc, "format_message"):
                err = exc.format_message()
            else:
                raise
    out["parse"].append([key, err])
for args in jobs["checks"]:
    r = runner.invoke(app, args, env=env)
    out["check"].append([r.exit_code, r.output[-2000:]])
with open(jobs["out"], "w") as f:
    json.dump(out, f)
"""


# Commands that must not parse, run with the docs' own: the check can fail.
CONTROLS = [
    (["run", "x.yaml", "--bogus"], "No such option: --bogus"),
    (["bench", "m.yaml", "--stop-after", "soon"], "--stop-after"),
    (["run"], "Missing argument"),
    (["config"], "no subcommand"),
]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    commands = qpeft_commands()
    checks = []
    for _, args in commands:
        if args[:1] == ["run"] and len(args) > 1 and args[1].endswith((".yaml", ".yml")) and (REPO / args[1]).is_file():
            check = [a for a in args if a != "--resume"]
            checks.append(check if "--check" in check else [*check, "--check"])
    out = tmp_path_factory.mktemp("docs") / "cli.json"
    documented = [a for _, a in commands if not a[0].startswith("<")]
    jobs = {"commands": documented + [c for c, _ in CONTROLS], "checks": checks, "out": str(out)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(jobs),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    results = json.loads(out.read_text())
    results["controls"] = results["parse"][len(documented) :]
    results["parse"] = results["parse"][: len(documented)]
    return commands, checks, results


def test_docs_show_qpeft_commands():
    where = {w.split(":")[0] for w, _ in qpeft_commands()}
    assert "README.md" in where and "docs/training.md" in where, where  # the extraction finds them


def test_every_documented_qpeft_command_parses(cli_results):
    commands, _, results = cli_results
    problems = [f"{where}: {args[0][1:-1]}" for where, args in commands if args[0].startswith("<")]
    parsed = iter(results["parse"])
    for where, args in commands:
        if args[0].startswith("<"):
            continue
        key, err = next(parsed)
        if err:
            problems.append(f"{where}: `qpeft {key}` does not accept it: {err}")
    for key, (code, output) in results["help"].items():
        if code != 0:
            problems.append(f"`qpeft {key} --help` exited {code}: {output}")
    assert not problems, "\n".join(problems)
    assert {"run", "bench run"} <= set(results["help"])


def test_documented_runs_of_repo_configs_pass_check(cli_results):
    _, checks, results = cli_results
    assert checks, "expected at least one `qpeft run configs/... ` in the docs"
    failed = [
        f"qpeft {' '.join(args)} -> exit {code}: {output.strip()}" for args, (code, output) in zip(checks, results["check"]) if code != 0
    ]
    assert not failed, "\n".join(failed)


def test_the_parse_check_refuses_bad_commands(cli_results):
    controls = cli_results[2]["controls"]
    for (args, message), (_, err) in zip(CONTROLS, controls, strict=True):
        assert err and message in err, (args, err)


def test_the_checks_catch_what_they_should(tmp_path):
    """The extraction and the slugs on a made-up page: a literal ``...``, console prompts,
    continuation lines and GitHub's heading anchors."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Getting started: `qpeft run`\n\n## Same\n\n## Same\n\n"
        "```console\n$ qpeft run a.yaml \\\n  --check\nconfig ok\n```\n\n```bash\nqpeft run a.yaml ...   # flags: elsewhere\n```\n"
    )
    assert {"getting-started-qpeft-run", "same", "same-1"} <= anchors(page)
    assert github_slug("FSDP (sharded base and adapter), with 4-bit bases") == "fsdp-sharded-base-and-adapter-with-4-bit-bases"
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading: yes!\n")
    links = tmp_path / "links.md"
    links.write_text(
        "[ok](other.md#a-code-heading-yes) [top](#links) [gone](missing.md) [bad anchor](other.md#nope) "
        "`[in code](missing2.md)` [web](https://example.com/x)\n\n# Links\n\n```md\n[in a block](missing3.md)\n```\n"
    )
    problems = link_problems([links])
    assert len(problems) == 2 and "(missing.md): no such file" in problems[0] and "#nope" in problems[1], problems
    found = [args for _, args in qpeft_commands([page])]
    assert found == [["run", "a.yaml", "--check"], ["<literal ... in the command>"]]
