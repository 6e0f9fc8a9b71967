"""The README's commands are the ones CI runs."""

import re

from conftest import REPO


def _readme_commands() -> dict:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    return {name: next(b.strip() for b in blocks if b.lstrip().startswith(f"# {name}")) for name in ("install", "run", "test")}


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    ci = (REPO / ".ci" / "run").read_text()
    cmds = _readme_commands()
    for name in ("install", "test"):
        for line in cmds[name].splitlines():
            if line.strip() and not line.startswith("#"):
                assert line in ci, f"README {name} command not in .ci/run: {line}"


def test_readme_run_command_uses_shipped_config():
    run = [l for l in _readme_commands()["run"].splitlines() if l.startswith("qpeft run")]
    assert run and (REPO / run[0].split()[2]).is_file()
