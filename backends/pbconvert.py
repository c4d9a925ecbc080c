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


@dataclass(frozen=True)
class _Field:
    """One field's way across, worked out once per class."""

    name: str
    parents: tuple[str, ...]  # messages on the way (a dotted rename)
    pb_name: str
    presence: bool  # written only when not the default (tracked, or under a parent message)
    tracked: bool  # the proto tells unset from a value (optional, a message, a oneof member)
    default: Callable[[], Any]
    codec: Optional[Codec]
    item: Optional[type]  # the converted dataclass it holds, alone or in a list
    kind: str  # "map", "repeated", "message" or "scalar"
    zero_is_default: bool  # a zero scalar reads back as the dataclass's own default (a fresh id)


_PLANS: dict[type, list[_Field]] = {}


def _plan(cls: type) -> list[_Field]:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = [_field(cls, f) for f in dataclasses.fields(cls)
                              if f.init and f.metadata.get("proto", True)]
    return plan


def _field(cls: type, f: dataclasses.Field) -> _Field:
    spec: _Spec = cls._pb_spec  # type: ignore[attr-defined]
    *parents, pb_name = spec.renames.get(f.name, f.name).split(".")
    d = spec.message.DESCRIPTOR
    for p in parents:
        d = d.fields_by_name[p].message_type
    fd = d.fields_by_name[pb_name]
    if fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        kind = "map"
    else:
        kind = "repeated" if fd.is_repeated else "message" if fd.message_type is not None else "scalar"
    if f.default is not dataclasses.MISSING:
        default: Callable[[], Any] = lambda v=f.default: v  # noqa: E731
    else:
        default = f.default_factory if f.default_factory is not dataclasses.MISSING else lambda: dataclasses.MISSING
    return _Field(f.name, tuple(parents), pb_name, fd.has_presence or bool(parents), fd.has_presence, default,
                  spec.codecs.get(f.name), _item_class(cls, f.name), kind,
                  f.default_factory is not dataclasses.MISSING and kind == "scalar")


def _item_class(cls: type, name: str) -> Optional[type]:
    hint = typing.get_type_hints(cls)[name]
    while True:
        if hasattr(hint, "_pb_spec"):
            return hint
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            return None
        hint = args[0]


def to_pb(obj: Any) -> PbMessage:
    """``obj`` as its proto message (in its envelope, if it has one)."""
    spec: _Spec = type(obj)._pb_spec
    if spec.envelope is None:
        m = spec.message()
        _fill(obj, m)
        return m
    # Filled in place: a message passed to the container's constructor is
    # built, then copied (a Chunk is one per event of every stream).
    container, field_name = spec.envelope
    out = container()
    inner = getattr(out, field_name)
    inner.SetInParent()
    _fill(obj, inner)
    return out


def _fill(obj: Any, m: PbMessage) -> None:
    for f in _plan(type(obj)):
        value = getattr(obj, f.name)
        if f.presence:
            if value == f.default():
                continue
        elif f.codec is None and not value and f.kind != "message":
            continue  # proto3 without presence: a zero, an empty list or map is what unset reads as
        target = m
        for p in f.parents:
            target = getattr(target, p)
            target.SetInParent()
        if f.codec is not None:
            value = f.codec.to_pb(value)
        elif f.item is not None:
            value = [to_pb(v) for v in value] if f.kind == "repeated" else to_pb(value)
        if f.kind == "map":
            getattr(target, f.pb_name).update(value)
        elif f.kind == "repeated":
            getattr(target, f.pb_name).extend(value)
        elif f.kind == "message":
            getattr(target, f.pb_name).CopyFrom(value)
        else:
            setattr(target, f.pb_name, value)


def from_pb(cls: type, m: PbMessage) -> Any:
    """The dataclass ``cls`` read from its proto message ``m``."""
    kw: dict[str, Any] = {}
    for f in _plan(cls):
        source = m
        for p in f.parents:
            source = getattr(source, p) if source is not None and source.HasField(p) else None
        if source is None or (f.tracked and not source.HasField(f.pb_name)):
            continue  # unset: the dataclass default
        value = getattr(source, f.pb_name)
        if f.codec is not None:
            kw[f.name] = f.codec.from_pb(value)
        elif f.kind == "map":
            kw[f.name] = dict(value)
        elif f.kind == "repeated":
            kw[f.name] = [from_pb(f.item, v) for v in value] if f.item is not None else list(value)
        elif f.item is not None:
            kw[f.name] = from_pb(f.item, value)
        elif not (f.zero_is_default and not value):
            kw[f.name] = value
    obj = cls(**kw)
    check = cls._pb_spec.check  # type: ignore[attr-defined]
    if check is not None:
        check(obj)
    return obj
