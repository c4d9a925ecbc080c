"""Modelfiles (Ollama's docs/modelfile.mdx), read as Ollama's parser reads
them (parser/parser.go): ``INSTRUCTION arguments`` lines, ``#`` comments,
instructions in any case, values running to the end of the line and
``"..."`` / ``\"\"\"...\"\"\"`` values spanning lines.  ``plan`` turns the
instructions into the body of ``POST /api/create``, leaving the local paths
(FROM a folder, ADAPTER) for the caller to upload.
"""

from __future__ import annotations

import codecs
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlxgate.dialects.ollama import OptionTypes

#: The instructions mlxgate's ``create`` knows (Ollama's, less DRAFT,
#: RENDERER, PARSER and REQUIRES, which have no meaning for MLX models).
COMMANDS = ("from", "license", "template", "system", "adapter", "parameter", "message")
ROLES = ("system", "user", "assistant")
#: Parameters Ollama's CLI warns about and leaves out (parser.go).
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                         "mirostat", "mirostat_tau", "mirostat_eta")

_INVALID_COMMAND = "command must be one of " + ", ".join(f'"{c}"' for c in COMMANDS)
_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'


class ModelfileError(ValueError):
    """A Modelfile that cannot be read, with the line where Ollama's parser says."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"(line {line}): {message}" if line else message)


@dataclass(frozen=True)
class Command:
    """One instruction: ``name`` is "model" for FROM, the parameter's name for
    PARAMETER, else the instruction in lower case; a MESSAGE's ``args`` is
    ``"<role>: <content>"``."""

    name: str
    args: str


# Parser states (parser.go's stateNil ... stateComment).
_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _is_space(c: str) -> bool:
    return c in " \t"


def _is_newline(c: str) -> bool:
    return c in "\r\n"


def _next_state(c: str, state: int, line: int, buf: list[str]) -> tuple[int, str]:
    """parser.go's parseRuneForState: the next state and the character to keep ("" for none)."""
    if state == _NIL:
        if c == "#":
            return _COMMENT, ""
        if _is_space(c) or _is_newline(c):
            return _NIL, ""
        return _NAME, c
    if state == _NAME:
        if c.isascii() and c.isalpha():
            return _NAME, c
        if _is_space(c):
            return _VALUE, ""
        raise ModelfileError(_INVALID_COMMAND, line)
    if state == _VALUE:
        return (_NIL, c) if _is_newline(c) or _is_space(c) else (_VALUE, c)
    if state in (_PARAMETER, _MESSAGE):
        if c.isascii() and (c.isalpha() or (state == _PARAMETER and (c.isdigit() or c == "_"))):
            return state, c
        if _is_space(c):
            return _VALUE, ""
        raise ModelfileError(f"unexpected end of {''.join(buf) or 'instruction'!r}: no value", line)
    # _COMMENT
    return (_NIL, "") if _is_newline(c) else (_COMMENT, "")


def _unquote(s: str) -> tuple[str, bool]:
    """A value without its quotes; False while a quote is still open."""
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def decode(data: bytes) -> str:
    """A Modelfile's bytes as text: UTF-8, or UTF-16 with its byte-order mark."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def parse(text: str) -> list[Command]:
    """The instructions of a Modelfile, in order; ``ModelfileError`` if it
    cannot be read or has no FROM."""
    commands: list[Command] = []
    state, line = _NIL, 1
    buf: list[str] = []
    name = role = ""
    for c in text:
        if _is_newline(c):
            line += 1
        nxt, keep = _next_state(c, state, line, buf)
        if nxt != state:
            if state == _NAME:
                word = "".join(buf).lower()
                if word not in COMMANDS:
                    raise ModelfileError(_INVALID_COMMAND, line)
                if word == "parameter":
                    nxt = _PARAMETER
                elif word == "message":
                    nxt, name = _MESSAGE, word
                else:
                    name = "model" if word == "from" else word
            elif state == _PARAMETER:
                name = "".join(buf)
            elif state == _MESSAGE:
                role = "".join(buf)
                if role not in ROLES:
                    raise ModelfileError(_INVALID_ROLE, line)
            elif state == _VALUE:
                value, closed = _unquote("".join(buf).strip())
                if not closed or _is_space(keep):  # a quote still open, or a space inside the value
                    buf.append(keep)
                    continue
                commands.append(Command(name, f"{role}: {value}" if role else value))
                role = ""
            buf = []
            state = nxt
        if keep.isprintable() and keep:
            buf.append(keep)
    if state == _VALUE:
        value, closed = _unquote("".join(buf).strip())
        if not closed:
            raise ModelfileError(f"unexpected end of file: a quote opened in {''.join(buf)[:40]!r} is not closed")
        commands.append(Command(name, f"{role}: {value}" if role else value))
    elif state not in (_NIL, _COMMENT):
        raise ModelfileError(f"unexpected end of file after {''.join(buf) or 'an instruction'!r}: no value")
    if not any(c.name == "model" for c in commands):
        raise ModelfileError("no FROM line")
    return commands


# ------------------------------------------------------------------ parameters


def _kind(annotation: Any) -> str:
    """"float", "int", "bool", "str" or "list" for an option's type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind(a) for a in args if a is not type(None)}
        return "list" if "list" in kinds else kinds.pop()
    if origin is list:
        return "list"
    return annotation.__name__


#: Each option Ollama's Modelfile may set, by the kind of its value (the one
#: declaration of the options: mlxgate/dialects/ollama.py).
PARAMETER_KINDS: dict[str, str] = {n: _kind(f.annotation) for n, f in OptionTypes.model_fields.items()}

_INT = re.compile(r"[+-]?[0-9]+")
_TRUE, _FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")


def parameter_value(name: str, value: str) -> Any:
    """A PARAMETER's value typed as Ollama's api.FormatParams types it."""
    kind = PARAMETER_KINDS.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter '{name}'")
    if kind == "float":
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ModelfileError(f"invalid float value {value!r} for parameter '{name}'")
        return number
    if kind == "int":
        if not _INT.fullmatch(value):
            raise ModelfileError(f"invalid int value {value!r} for parameter '{name}'")
        return int(value)
    if kind == "bool":
        if value not in _TRUE + _FALSE:
            raise ModelfileError(f"invalid bool value {value!r} for parameter '{name}'")
        return value in _TRUE
    return value


# ------------------------------------------------------------------ the request


@dataclass
class CreatePlan:
    """What a Modelfile asks ``POST /api/create`` for: ``body`` without
    ``model``, ``files`` and ``adapters``; the local paths whose files go up
    as blobs first; warnings to print."""

    body: dict[str, Any] = field(default_factory=dict)
    #: FROM naming a local folder (or file): its model files become ``files``.
    model_path: Optional[Path] = None
    #: ADAPTER paths: their files become ``adapters``.
    adapter_paths: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def local_path(arg: str, base: Path) -> Path:
    """A FROM or ADAPTER argument as a path: ``~`` expanded, a relative one
    taken from the Modelfile's folder (as Ollama's expandPath)."""
    p = Path(arg).expanduser()
    return p if p.is_absolute() else base / p


def plan(commands: list[Command], base: Path) -> CreatePlan:
    """The create request of ``commands`` (from ``parse``); a FROM whose
    argument names an existing path (relative to ``base``, the Modelfile's
    folder) is a local model, any other is a model's name (``from``)."""
    out = CreatePlan()
    params: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    licenses: list[str] = []
    for c in commands:
        if c.name == "model":
            path = local_path(c.args, base)
            if path.exists():
                out.model_path = path
                out.body.pop("from", None)
            else:
                out.body["from"] = c.args
                out.model_path = None
        elif c.name == "adapter":
            path = local_path(c.args, base)
            if not path.exists():
                raise ModelfileError(f"ADAPTER {c.args}: no such file or folder ({path})")
            out.adapter_paths.append(path)
        elif c.name in ("template", "system"):
            out.body[c.name] = c.args
        elif c.name == "license":
            licenses.append(c.args)
        elif c.name == "message":
            role, _, content = c.args.partition(": ")
            messages.append({"role": role, "content": content})
        elif c.name in DEPRECATED_PARAMETERS:
            out.warnings.append(f"warning: parameter {c.name} is deprecated")
        else:
            value = parameter_value(c.name, c.args)
            if PARAMETER_KINDS[c.name] == "list":
                params.setdefault(c.name, []).append(value)
            else:
                params[c.name] = value
    if params:
        out.body["parameters"] = params
    if messages:
        out.body["messages"] = messages
    if licenses:
        out.body["license"] = licenses
    return out
