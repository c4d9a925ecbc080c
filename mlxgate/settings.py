"""Each setting declared once: a configuration dataclass field that carries
its environment variables, its flag and its help (``setting(...)``).

From those declarations (``mlxgate/config.py``), and nothing else:

- ``mlxgate/config_load.py`` fills the dataclasses from the TOML file (key
  ``section.field``), the environment and the flags, converting each value
  by the field's type (``convert``);
- ``mlxgate_cli/flags.py`` builds the argparse flags and their help;
- ``markdown_table`` writes README.md's configuration table (``make
  readme``), which ``tests/test_settings.py`` checks.

A field declared with plain ``field()`` is not a setting a person sets (the
generated test model's folder, the notes loading made); the TOML file may
still name it, as before.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Optional, Union

#: The key of a field's ``metadata`` that holds its ``Setting``.
_KEY = "mlxgate.setting"

#: Values of a boolean variable that mean "on"; anything else is off.
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Setting:
    """What a configuration field is to the person setting it."""

    #: What it does, for README.md (Markdown) and ``--help`` (the Markdown stripped).
    help: str
    #: Variables converted by the field's type, in order of precedence (the
    #: first one set wins; each one set is still read, so a bad value fails).
    env: tuple[str, ...] = ()
    #: Variables the loader reads with code of its own (OLLAMA_HOST's
    #: host:port, the origin lists that add up, the cloud providers); listed
    #: in the table, not applied by type.
    also: tuple[str, ...] = ()
    #: The command line flag, e.g. ``--host``; a list field's flag is repeated.
    flag: str = ""
    #: The commands that take the flag.
    commands: tuple[str, ...] = ("serve", "service")
    metavar: Optional[str] = None
    #: The default in words, where the value does not say it.
    shown_default: str = ""
    #: The TOML spelling where it is not ``section.field`` (``[[remote]]``).
    toml: str = ""
    #: Text to value beyond the field's type (Go durations for keep_alive).
    parse: Optional[Callable[[str], Any]] = None


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, repr: bool = True, help: str,
            **what: Any) -> Any:
    """A dataclass field that is a setting: ``port: int = setting(11434, env=(...), flag="--port", help=...)``."""
    return dataclasses.field(default=default, default_factory=default_factory, repr=repr,
                             metadata={_KEY: Setting(help=help, **what)})


@dataclass(frozen=True)
class Row:
    """One setting in the table: where it lives and how it is declared."""

    #: ``server.host``; ``log_level`` at the top; "" for one with no field (``--config``).
    key: str
    setting: Setting
    default: Any = None
    #: The field's type, resolved (``Optional[str]``, ``list[str]``, ...).
    type: Any = str

    @property
    def variables(self) -> tuple[str, ...]:
        return (*self.setting.env, *self.setting.also)

    @property
    def toml(self) -> str:
        return self.setting.toml or self.key

    @property
    def base_type(self) -> Any:
        """The field's type without ``Optional``."""
        return _unwrapped(self.type)

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base_type) is list


def rows(root: type, prefix: str = "") -> list[Row]:
    """Every setting under the dataclass ``root``, in declaration order,
    sections (fields whose type is a dataclass) walked in place."""
    out: list[Row] = []
    hints = _hints(root)
    for f in dataclasses.fields(root):
        declared = f.metadata.get(_KEY)
        kind = hints[f.name]
        if declared is not None:
            out.append(Row(f"{prefix}{f.name}", declared, _default(f), kind))
        elif dataclasses.is_dataclass(kind):
            out.extend(rows(kind, f"{prefix}{f.name}."))
    return out


def declared(section: type, name: str) -> Optional[Setting]:
    """The ``Setting`` of ``section.name``, or None for a plain field."""
    for f in dataclasses.fields(section):
        if f.name == name:
            return f.metadata.get(_KEY)
    return None


def field_type(section: type, name: str) -> Any:
    """The resolved type of ``section.name``; KeyError for no such field."""
    return _hints(section)[name]


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _unwrapped(kind: Any) -> Any:
    """``Optional[X]`` -> X."""
    if typing.get_origin(kind) is Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def split_list(value: str) -> list[str]:
    """A comma-separated value as a list (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def convert(value: Any, kind: Any, parse: Optional[Callable[[str], Any]] = None, name: str = "") -> Any:
    """An environment or flag string, or a TOML value, as a field of type ``kind``.

    Lists take comma-separated text or a list of strings; other non-text
    values (TOML's own numbers and booleans) are kept as they are."""
    kind = _unwrapped(kind)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            return split_list(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings")
        return list(value)
    if not isinstance(value, str):
        return value
    if parse is not None:
        return parse(value)
    if kind is bool:
        return value.strip().lower() in TRUE_WORDS
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    return value


# ------------------------------------------------------------------ shown


def shown_default(row: Row) -> str:
    """The default as the README shows it (Markdown)."""
    if row.setting.shown_default:
        return row.setting.shown_default
    v = row.default
    if v is None or v == "" or v == [] or v == {}:
        return "—"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int) and row.key.endswith("_bytes"):
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
            if v >= size and v % size == 0:
                return f"{v // size} {unit}"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"`{v}`"


def plain(markdown: str) -> str:
    """Markdown as ``--help`` text: links to their text, no backticks."""
    return re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", markdown).replace("`", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: list[Row]) -> str:
    """README.md's configuration table."""
    lines = ["| setting (TOML) | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for row in table:
        flag = f"`{row.setting.flag}`" if row.setting.flag else ""
        if flag and row.is_list:
            flag += " (repeatable)"
        variables = ", ".join(f"`{v}`" for v in row.variables)
        if variables and row.is_list and not row.setting.toml:
            variables += " (comma-separated)"
        lines.append("| " + " | ".join(_cell(c) for c in (
            f"`{row.toml}`" if row.toml else "—",
            flag,
            variables,
            shown_default(row),
            row.setting.help,
        )) + " |")
    return "\n".join(lines) + "\n"


#: README.md's generated table sits between these two lines.
BEGIN = "<!-- settings table: generated from mlxgate/config.py by `make readme`; tests/test_settings.py checks it -->"
END = "<!-- end of the settings table -->"


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between ``BEGIN`` and ``END`` replaced by ``table``."""
    head, sep, rest = readme.partition(BEGIN + "\n")
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README.md has no settings table markers ({BEGIN!r} ... {END!r})")
    return f"{head}{BEGIN}\n\n{table}\n{END}{tail}"
