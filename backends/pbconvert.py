"""Domain dataclass <-> proto message, by field name, read from the message's descriptor.

The types of ``backends/types.py`` name their fields as the proto does, so
one converter serves them all: ``@proto(pb.X)`` gives a dataclass
``to_pb()`` and ``from_pb(m)``.  What does not match by name is said in the
decorator, per field: a rename (a dotted path reaches into a nested message:
``"chat.messages"``) or a ``Codec`` (an enum as a word, JSON carried as text,
a timestamp, a duration).  Nested dataclasses and lists of them are found
from the type hints.

Presence: a field the proto tracks (``optional``, a message, a oneof member)
is written only when the value is not the dataclass default, and reads back
as the default when unset; so None stays "unset".  A plain scalar at its
zero value reads back as the dataclass default when that default is made by
a factory (``request_id``: a fresh id).  A field with
``metadata={"proto": False}`` has no proto form and is left out.

This converts; it does not judge.  A caller's request is checked and
converted by the accept step (``backends/accept.py``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from google.protobuf.message import Message as PbMessage


@dataclass(frozen=True)
class Codec:
    """A field whose proto form is not its domain form: ``to_pb`` gives what is
    set on (or extends) the proto field, ``from_pb`` reads the proto field's value."""

    to_pb: Callable[[Any], Any]
    from_pb: Callable[[Any], Any]


def enum_codec(words: dict[str, int], unknown: Callable[[int], Any]) -> Codec:
    """A word <-> a proto enum number; ``unknown(number)`` answers (or raises) for the rest."""
    numbers = {v: k for k, v in words.items()}
    return Codec(lambda w: words[w], lambda n: numbers[n] if n in numbers else unknown(n))


def each(codec: Codec) -> Codec:
    """``codec`` applied to every item of a repeated field."""
    return Codec(lambda xs: [codec.to_pb(x) for x in xs], lambda xs: [codec.from_pb(x) for x in xs])


@dataclass(frozen=True)
class _Spec:
    message: type
    renames: dict[str, str]
    codecs: dict[str, Codec]
    envelope: Optional[tuple[type, str]]
    check: Optional[Callable[[Any], None]]


def proto(message: type, *, renames: Optional[dict[str, str]] = None, codecs: Optional[dict[str, Codec]] = None,
          envelope: Optional[tuple[type, str]] = None,
          check: Optional[Callable[[Any], None]] = None) -> Callable[[type], type]:
    """Give a dataclass ``to_pb`` / ``from_pb`` for ``message``.

    ``envelope``: (container, field): ``to_pb`` answers the container holding
    the message in that field (a Chunk travels as a GenerateResponse); ``from_pb`` reads the inner
    message.  ``check``: run on what ``from_pb`` built."""

    def register(cls: type) -> type:
        cls._pb_spec = _Spec(message, renames or {}, codecs or {}, envelope, check)  # type: ignore[attr-defined]
        if "to_pb" not in cls.__dict__:
            cls.to_pb = to_pb  # type: ignore[attr-defined]
        if "from_pb" not in cls.__dict__:
            cls.from_pb = classmethod(from_pb)  # type: ignore[attr-defined]
        return cls

    return register


def _converted(cls: type) -> list[dataclasses.Field]:
    """The fields with a proto form (``metadata={"proto": False}``: one without)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("proto", True)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


_HINTS: dict[type, dict[str, Any]] = {}


def _item_class(cls: type, name: str) -> Optional[type]:
    """The converted dataclass a field holds (alone, optional, or in a list), if any."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    hint = hints[name]
    while True:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hasattr(hint, "_pb_spec"):
            return hint
        if len(args) != 1:
            return None
        hint = args[0]


def _place(m: PbMessage, path: str, create: bool) -> tuple[Optional[PbMessage], str]:
    """The message holding the last name of ``path`` (None: a parent is unset and not created)."""
    *parents, name = path.split(".")
    for p in parents:
        if not create and not m.HasField(p):
            return None, name
        m = getattr(m, p)
        if create:
            m.SetInParent()
    return m, name


def _descriptor(message: type, path: str) -> Any:
    d = message.DESCRIPTOR
    *parents, name = path.split(".")
    for p in parents:
        d = d.fields_by_name[p].message_type
    return d.fields_by_name[name]


def to_pb(obj: Any) -> PbMessage:
    """``obj`` as its proto message (in its envelope, if it has one)."""
    spec: _Spec = type(obj)._pb_spec
    m = spec.message()
    for f in _converted(type(obj)):
        value = getattr(obj, f.name)
        path = spec.renames.get(f.name, f.name)
        fd = _descriptor(spec.message, path)
        if (fd.has_presence or "." in path) and value == _default(f):
            continue
        target, name = _place(m, path, create=True)
        assert target is not None
        codec = spec.codecs.get(f.name)
        if codec is not None:
            value = codec.to_pb(value)
        elif _item_class(type(obj), f.name) is not None:
            value = [to_pb(v) for v in value] if isinstance(value, list) else to_pb(value)
        _set(target, fd, value)
    if spec.envelope is None:
        return m
    container, field_name = spec.envelope
    return container(**{field_name: m})


def _set(target: PbMessage, fd: Any, value: Any) -> None:
    name = fd.name
    if fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        getattr(target, name).update(value)
    elif fd.is_repeated:
        getattr(target, name).extend(value)
    elif fd.message_type is not None:
        getattr(target, name).CopyFrom(value)
    else:
        setattr(target, name, value)


def from_pb(cls: type, m: PbMessage) -> Any:
    """The dataclass ``cls`` read from its proto message ``m``."""
    spec: _Spec = cls._pb_spec  # type: ignore[attr-defined]
    kw: dict[str, Any] = {}
    for f in _converted(cls):
        source, name = _place(m, spec.renames.get(f.name, f.name), create=False)
        if source is None:
            continue
        fd = source.DESCRIPTOR.fields_by_name[name]
        if fd.has_presence and not source.HasField(name):
            continue
        value = getattr(source, name)
        codec = spec.codecs.get(f.name)
        if codec is not None:
            kw[f.name] = codec.from_pb(value)
            continue
        item = _item_class(cls, f.name)
        if fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            kw[f.name] = dict(value)
        elif fd.is_repeated:
            kw[f.name] = [from_pb(item, v) for v in value] if item is not None else list(value)
        elif item is not None:
            kw[f.name] = from_pb(item, value)
        elif not value and f.default_factory is not dataclasses.MISSING:
            continue  # a zero scalar: the dataclass makes its own (a fresh request id)
        else:
            kw[f.name] = value
    obj = cls(**kw)
    if spec.check is not None:
        spec.check(obj)
    return obj
