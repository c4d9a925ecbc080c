"""The flags of ``mlxgate serve`` and ``mlxgate service``, built from the
settings table (``mlxgate.config.TABLE``): each flag's type, help, variables
and default come from the setting it sets, and ``overrides`` turns the parsed
flags back into the "section.field" values ``load_config`` applies last."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from mlxgate.config import TABLE
from mlxgate.settings import Row, plain, shown_default


def described(text: str, variables: tuple[str, ...] = (), default: Optional[str] = None) -> str:
    """Help text with the variables that also set it and its default."""
    notes = [f"env {' or '.join(variables)}"] if variables else []
    if default and default != "—":
        notes.append(f"default: {plain(default)}")
    text = f"{plain(text)} ({'; '.join(notes)})" if notes else plain(text)
    return text.replace("%", "%%")  # argparse formats help with %


def _variables(row: Row) -> tuple[str, ...]:
    names = row.variables
    return (f"{names[0]}, comma-separated", *names[1:]) if row.is_list and names else names


def add_setting_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command`` ("serve" or "service"), ``dest`` the setting's key."""
    for row in TABLE:
        s = row.setting
        if not s.flag or command not in s.commands:
            continue
        kw: dict[str, Any] = {"dest": row.key or "config",
                              "help": described(s.help, _variables(row), shown_default(row) if row.key else None)}
        if row.base_type is bool:
            kw.update(action="store_true", default=None)
        else:
            kw["metavar"] = s.metavar or s.flag.lstrip("-").upper().replace("-", "_")
            if row.is_list:
                kw["action"] = "append"
            elif row.base_type in (int, float):
                kw["type"] = row.base_type
        parser.add_argument(s.flag, **kw)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags gave ("section.field" -> value; None: not given)."""
    return {row.key: getattr(args, row.key, None) for row in TABLE if row.key and row.setting.flag}
