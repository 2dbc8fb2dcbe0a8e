"""The shape of the code: import direction, one place for training modes, module sizes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSITION_ROOTS = {"fedsplit/server_app.py", "fedsplit/simulate.py"}  # they wire apps in
APPS = ("strategies", "clients")
MAX_LINES = 420  # "~400": no module in the library or the apps grows past this


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_library_imports_no_app() -> None:
    offenders = {}
    for path in python_files("fedsplit"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in COMPOSITION_ROOTS:
            continue
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in APPS)
        if bad:
            offenders[rel] = bad
    assert not offenders, f"library modules importing apps: {offenders}"


def test_no_mode_name_comparisons_outside_the_modes_registry() -> None:
    pattern = re.compile(r"""mode\s*(==|!=|\bin\b|\bnot in\b)\s*[("']""")
    offenders = []
    for path in python_files("fedsplit", "strategies", "clients"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("fedsplit/modes/") or rel.startswith("fedsplit/deploy/"):
            continue  # deploy's "mode" is the link shaper's (netem / tbf), not a training mode
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_modules_stay_small() -> None:
    big = {p.relative_to(ROOT).as_posix(): n for p in python_files("fedsplit", *APPS)
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
