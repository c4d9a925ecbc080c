"""``make readme``: rewrite README.md's configuration table from the settings
table (``mlxgate.config.TABLE``); ``tests/test_settings.py`` fails while the
two differ."""

from __future__ import annotations

import sys
from pathlib import Path

from mlxgate.config import TABLE
from mlxgate.settings import markdown_table, with_table


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    text = path.read_text(encoding="utf-8")
    new = with_table(text, markdown_table(TABLE))
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: configuration table rewritten")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
