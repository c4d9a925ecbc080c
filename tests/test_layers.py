"""Dependencies point one way (docs/architecture.md, "Layers"), checked by import-linter.

mlxgate_cli -> (gateway | backends, independent of each other) -> mlxgate;
the dialect models import nothing of the project but the leaf modules.
The contracts are in pyproject.toml ([tool.importlinter]).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_front_imports_nothing_from_the_service() -> None:
    """Also without import-linter: no module of gateway/ names backends (nor the reverse)."""
    for package, other in (("gateway", "backends"), ("backends", "gateway"), ("mlxgate", "backends"),
                           ("mlxgate", "gateway"), ("mlxgate", "mlxgate_cli")):
        for path in (ROOT / package).rglob("*.py"):
            bad = {m for m in _imports(path) if m == other or m.startswith(other + ".")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


#: Modules allowed past the size limit, and why: declarative tables — the wire
#: models, and the settings (each declared once, with its env, flag and help).
LONG_ALLOWED = {"mlxgate/dialects/*.py", "mlxgate/config.py"}
MAX_MODULE_LINES = 600


def test_no_hand_written_module_is_too_long_to_read_at_once() -> None:
    long = []
    for package in ("mlxgate", "mlxgate_cli", "gateway", "backends"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.name.endswith(("_pb2.py", "_pb2_grpc.py")) or any(rel.match(p) for p in LONG_ALLOWED):
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_MODULE_LINES:
                long.append(f"{rel} ({lines} lines)")
    assert not long, f"over {MAX_MODULE_LINES} lines: {', '.join(long)}"
