"""Regenerate the generated parts of the docs from the installed plugins' declared capabilities.

    python scripts/gen_docs.py

Writes the method × quantizer table into docs/methods.md and the plugin table into README.md,
between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from qpeft import capability_table
from qpeft.io import atomic_write_text
from qpeft.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


def plugin_table(registry) -> str:
    rows = ["| kind | name | description | devices | capabilities |", "|---|---|---|---|---|"]
    for kind in ("quantizer", "peft", "trainer", "tracker"):
        for name, p in sorted(registry.backends[kind].items()):
            c = p.capabilities
            flags = []
            if kind == "quantizer":
                flags.append(f"merge source: {c.merge_source}")
                if c.bits:
                    flags.append(f"{c.bits:g}-bit")
            if kind == "peft":
                flags.append("mergeable" if c.mergeable else "not mergeable")
            if kind == "tracker":
                flags.append(f"needs {p.requires} (`qpeft[{p.extra}]`)")
            if not c.grad_checkpointing:
                flags.append("no gradient checkpointing")
            flags += [f"not with {k}: {v}" for k, v in c.incompatible.items()]
            if c.fsdp:
                flags.append("FSDP")
            rows.append(f"| {kind} | `{name}` | {p.description} | {', '.join(c.devices)} | {'; '.join(flags)} |")
    return "\n".join(rows) + "\n"


def replace_block(path: Path, name: str, body: str) -> None:
    text = path.read_text()
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"{path}: no <!-- generated:{name} --> block")
    atomic_write_text(path, pattern.sub(lambda m: m.group(1) + body + m.group(2), text))


def main() -> None:
    registry = load_registry()
    replace_block(REPO / "docs" / "methods.md", "methods", capability_table.markdown(registry))
    replace_block(REPO / "README.md", "plugins", plugin_table(registry))
    print("docs regenerated")


if __name__ == "__main__":
    main()
