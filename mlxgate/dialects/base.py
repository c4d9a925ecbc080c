"""What every dialect module shares: the request base model, bound helpers,
the validation-error wording, the unknown-field log and the tool-call
argument rules.

A dialect module (``ollama.py``, ``openai.py``, ...) declares one wire format
once: request ``BaseModel``s (parsed once per request, ``extra="allow"``),
response ``TypedDict``s (rendered as plain dicts, never validated per chunk),
and the dialect's constants.  Two kinds of bounds appear on request fields:

- **wire rules** of the dialect (types, enums, OpenAI's 0-2 temperature, a
  value that must fit the proto's int32): ``Field(ge=..., le=...)``,
  enforced by the model, so a violation is a 400 naming the field;
- **contract limits** (``mlxgate/limits.py``: 64 stop sequences, 4,096
  messages, ...) and contract ranges (``top_p`` in [0, 1]): ``Limit(...)``,
  which only *documents* the bound in the JSON schema (and so in
  ``/openapi.json``).  The inference service enforces them, once, for every
  caller (``backends/accept.py``).

Imports: pydantic, the standard library and ``mlxgate.limits`` /
``mlxgate.jsonutil`` only (see docs/architecture.md, "Layers").
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, WithJsonSchema
from typing_extensions import Annotated

from mlxgate import jsonutil, limits

log = logging.getLogger("mlxgate.dialects")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# ---------------------------------------------------------------- bounds


@dataclass(frozen=True)
class Limit:
    """A bound that is documented in the JSON schema but enforced elsewhere
    (the inference service's contract validation): ``Limit(maxItems=64)``.

    Annotated metadata; pydantic calls ``__get_pydantic_json_schema__`` when
    it renders the field's schema and never validates with it."""

    schema: tuple[tuple[str, Any], ...]

    def __init__(self, **schema: Any) -> None:
        object.__setattr__(self, "schema", tuple(sorted(schema.items())))

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        js = handler(core_schema)
        js.update(dict(self.schema))
        return js


def contract_range(name: str) -> Limit:
    """The contract's range of a sampling knob (``limits.SAMPLING_RANGES``),
    documented on a dialect field and enforced by the inference service."""
    lo, hi, lo_open = limits.SAMPLING_RANGES[name]
    bounds: dict[str, Any] = {}
    if lo is not None:
        bounds["exclusiveMinimum" if lo_open else "minimum"] = lo
    if hi is not None:
        bounds["maximum"] = hi
    return Limit(**bounds)


def _integral(v: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (1.5 stays a float and
    fails).  Beyond 2**53 a float is not an integer a caller meant: the JSON
    parser turned a too-large integer (-2**63 - 1) into the nearest float,
    which may land on a valid bound; it stays a float and fails."""
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
        return int(v)
    return v


#: An integer; an integral JSON float (5.0) is accepted as one.
Int = Annotated[int, BeforeValidator(_integral)]


def integer(lo: Optional[int] = None, hi: Optional[int] = None) -> Any:
    """An integer within [lo, hi], enforced here (a wire rule).  The bounds
    come before the validator so that the JSON schema states them as
    minimum/maximum."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]


#: Integers the proto carries in int32 / int64 fields (a wire rule: larger ones cannot be sent).
Int32 = integer(INT32_MIN, INT32_MAX)
Int64 = integer(INT64_MIN, INT64_MAX)
#: A model name (its length is a contract limit).
ModelName = Annotated[str, Limit(maxLength=limits.MAX_MODEL_NAME_CHARS)]
#: One stop sequence, and a request's list of them (contract limits).
StopText = Annotated[str, Limit(maxLength=limits.MAX_STOP_CHARS)]
StopList = Annotated[list[StopText], Limit(maxItems=limits.MAX_STOP_SEQUENCES)]
#: A tool's name (contract limit).
ToolName = Annotated[str, Limit(maxLength=limits.MAX_TOOL_NAME_CHARS)]


def _b64(v: Any) -> Any:
    """Base64 text (a ``data:`` URL prefix tolerated) to bytes; bytes pass (building a request)."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if not isinstance(v, str):
        raise ValueError(f"must be a base64 string, got {json_type(v)}")
    if v.startswith("data:") and "," in v:
        v = v.split(",", 1)[1]
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: The Python type each JSON Schema type of an ``ignored`` field is checked with.
_IGNORED_TYPES: dict[str, Any] = {"boolean": bool, "string": str, "number": float, "object": dict[str, Any]}


def ignored(json_schema: dict[str, Any]) -> Any:
    """A field the dialect defines that has no meaning here: documented with
    the dialect's type, type-checked against it (a documented boolean that
    comes as an object is a 400 naming the field, as the dialect's own server
    would answer), then ignored.  ``{}``: any value."""
    kind = json_schema.get("type")
    if kind == "integer":
        python: Any = Int
    elif kind == "array":
        python = list[Int] if json_schema.get("items", {}).get("type") == "integer" else list[Any]
    else:
        python = _IGNORED_TYPES.get(kind, Any) if isinstance(kind, str) else Any
    return Annotated[python, WithJsonSchema({**json_schema, "description": "accepted and ignored"})]


#: OpenAI's image detail (``image_url.detail``, ``input_image.detail``).
ImageDetail = Literal["auto", "low", "high"]
IMAGE_DETAIL_RULE = ("low: the image is scaled down to at most 512 pixels on its longest side and not split into "
                     "tiles, so it costs fewer tokens; high and auto (the default): the model's own resolution")

#: What every image must be (checked at the service from its header,
#: ``backends/images.py``), for the descriptions of image fields.
IMAGE_RULES = (
    f"a {', '.join(limits.IMAGE_FORMATS)} image of at most {limits.MAX_IMAGE_BYTES} bytes and "
    f"{limits.MAX_IMAGE_PIXELS} pixels (width x height, read from its header before decoding; "
    f"{limits.MAX_REQUEST_IMAGE_PIXELS} pixels for all the images of a request); otherwise 400"
)
#: What an image URL gets.
#: The settings that turn fetching image URLs on and bound it (declared in
#: ``mlxgate.config``; named here because the dialect models may not import it).
FETCH_IMAGE_URLS_ENV = "MLXGATE_FETCH_IMAGE_URLS"
FETCH_PRIVATE_ENV = "MLXGATE_FETCH_PRIVATE"
FETCH_IMAGE_TIMEOUT_ENV = "MLXGATE_FETCH_IMAGE_TIMEOUT"
IMAGE_URL_RULE = (
    f"http(s) URLs are 400 unless the server runs with {FETCH_IMAGE_URLS_ENV}=1; then fetched within "
    f"{FETCH_IMAGE_TIMEOUT_ENV} seconds, at most {limits.MAX_IMAGE_BYTES} bytes, 3 redirects, image/* only, "
    f"public addresses only unless {FETCH_PRIVATE_ENV}=1"
)

#: Bytes that travel as base64 text (Ollama's ``images``).
Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_b64),
    PlainSerializer(b64encode, return_type=str),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


# ---------------------------------------------------------------- the base model


class WireModel(BaseModel):
    """A request (or request part) of some dialect.

    Strict types (``"5"`` is not a number, ``"yes"`` not a boolean), unknown
    fields kept in ``model_extra`` (and logged by ``log_unknown``), ``null``
    accepted wherever a field is optional (it means "absent")."""

    model_config = ConfigDict(extra="allow", strict=True, ser_json_inf_nan="null")

    def dump(self) -> dict[str, Any]:
        """The JSON body of this request, as an upstream adapter sends it (unset fields left out)."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


# ---------------------------------------------------------------- parts both REST dialects share


class ToolFunction(WireModel):
    name: Annotated[ToolName, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="JSON schema of the arguments")
    strict: Optional[ignored({"type": "boolean"})] = None


class Tool(WireModel):
    """A function the model may call (the same shape in Ollama's and OpenAI's APIs)."""

    type: Optional[Literal["function"]] = Field(None, description='"function" (the only kind)')
    function: ToolFunction


# ---------------------------------------------------------------- errors


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


@dataclass
class WireError:
    """The first problem of a request, named by its path ("messages[2].role")."""

    path: str
    message: str


def _path(loc: tuple[Any, ...], data: Any, missing: bool = False) -> tuple[str, Any]:
    """The loc's field path, walked against the input (so the union tags
    pydantic inserts, such as 'str' or 'list[str]', are skipped), and the
    value there.  ``missing``: the last part names a field that is absent."""
    out = ""
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            out = f"{out}.{part}" if out else part
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out = f"{out}[{part}]"
            node = node[part]
        elif missing and i == len(loc) - 1 and isinstance(part, str):
            return (f"{out}.{part}" if out else part), None
    return out, node


_WANT = {
    "string_type": "a string",
    "bool_type": "a boolean",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "finite_number": "a number",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "typed_dict_type": "an object",
    "bytes_type": "a base64 string",
}


def _one(err: dict[str, Any], data: Any) -> WireError:
    kind = err.get("type", "")
    path, value = _path(tuple(err.get("loc", ())), data, missing=kind == "missing")
    ctx = err.get("ctx") or {}
    where = path or "request body"
    if kind == "missing":
        return WireError(path, f"{where} is required")
    if kind in _WANT:
        return WireError(path, f"{where} must be {_WANT[kind]}, got {json_type(value)}")
    if kind == "greater_than_equal":
        return WireError(path, f"{where} must be at least {ctx.get('ge')}, got {value}")
    if kind == "greater_than":
        return WireError(path, f"{where} must be greater than {ctx.get('gt')}, got {value}")
    if kind == "less_than_equal":
        return WireError(path, f"{where} must be at most {ctx.get('le')}, got {value}")
    if kind == "less_than":
        return WireError(path, f"{where} must be less than {ctx.get('lt')}, got {value}")
    if kind == "literal_error":
        return WireError(path, f"{where} must be {ctx.get('expected')}, got {limits.clip_name(repr(value))}")
    if kind == "union_tag_invalid":
        # A discriminated union ({"type": ...} blocks): name the tag field and the tags it takes.
        tag_field = str(ctx.get("discriminator", "type")).strip("'")
        return WireError(f"{path}.{tag_field}" if path else tag_field,
                         f"{where}.{tag_field} must be one of {ctx.get('expected_tags')}, "
                         f"got {limits.clip_name(repr(ctx.get('tag')))}")
    if kind == "union_tag_not_found":
        tag_field = str(ctx.get("discriminator", "type")).strip("'")
        return WireError(f"{path}.{tag_field}" if path else tag_field, f"{where}.{tag_field} is required")
    if kind in ("too_short", "string_too_short"):
        return WireError(path, f"{where} is required (it must not be empty)")
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error") or err.get("msg", ""))
        if msg.startswith(where):
            return WireError(path, msg)
        return WireError(path, f"{where} {msg}" if msg.startswith(("must ", "is ", "are ")) else f"{where}: {msg}")
    return WireError(path, f"{where}: {err.get('msg', 'invalid value')}")


def wire_error(exc: ValidationError, data: Any) -> WireError:
    """One error of a failed validation, worded for a caller: the deepest
    (most specific) one; where a union's alternatives all failed on type at
    the same place (``"stop": 5``), what the field may be."""
    errors = exc.errors(include_url=False, include_input=False)
    located = [(_path(tuple(e.get("loc", ())), data, e.get("type") == "missing"), e) for e in errors]
    (path, value), err = max(located, key=lambda pe: pe[0][0].count(".") + pe[0][0].count("["))
    same = [e for (p, _), e in located if p == path]
    if len(same) > 1 and all(e.get("type") in _WANT for e in same):
        wants = " or ".join(dict.fromkeys(_WANT[e["type"]] for e in same))
        return WireError(path, f"{path or 'request body'} must be {wants}, got {json_type(value)}")
    return _one(err, data)


# ---------------------------------------------------------------- unknown fields


@functools.lru_cache(maxsize=1024)
def _note_unknown(route: str, name: str) -> None:
    """Logged once per (route, field name); the cache bounds the memory an
    attacker's random names can take (old names may then be logged again)."""
    log.info("%s: ignoring unknown field %s", route, name)


def unknown_fields(model: BaseModel, prefix: str = "") -> Iterator[str]:
    """Names of the fields a caller sent that the model does not declare,
    nested ones as "messages[].foo"."""
    for name in model.model_extra or ():
        yield f"{prefix}{name}"
    # Only what the caller sent can hold unknown fields (defaults hold none).
    for name in model.model_fields_set:
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            yield from unknown_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for item in value:
                if isinstance(item, BaseModel):
                    yield from unknown_fields(item, f"{prefix}{name}[].")


#: Unknown names logged from one request at most (a body of a million keys
#: must not become a million log lines).
MAX_UNKNOWN_LOGGED = 16


def log_unknown(model: BaseModel, route: str) -> None:
    for i, name in enumerate(unknown_fields(model)):
        if i >= MAX_UNKNOWN_LOGGED:
            break
        _note_unknown(route, limits.clip_name(name))


# ---------------------------------------------------------------- tool-call arguments
#
# One rule per direction (docs/architecture.md, "Tool-call arguments"):
# - what a *caller* sends (HTTP body, gRPC arguments_json) must be a JSON
#   object, or JSON text of one: anything else is refused, naming the field
#   (400 / INVALID_ARGUMENT);
# - what an *upstream or the model* produced is never refused nor dropped:
#   an object is kept, JSON text of an object is parsed, and anything else
#   is kept verbatim as {"_raw": "<text>"}.


def caller_arguments(value: Any, what: str) -> dict[str, Any]:
    """Tool-call arguments a caller sent; ValueError (message names ``what``) when not an object."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        jsonutil.check_depth(value, what)
        return value
    if isinstance(value, str):
        return jsonutil.loads_object(value, what)
    raise jsonutil.JSONError(f"{what} must be a JSON object or JSON text of one, got {json_type(value)}")


def produced_arguments(value: Any) -> dict[str, Any]:
    """Tool-call arguments an upstream or a model produced: kept whatever they are."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    text = value if isinstance(value, str) else jsonutil.dumps(value)
    if not text.strip():
        return {}
    try:
        parsed = jsonutil.loads(text, "tool-call arguments")
    except jsonutil.JSONError:
        return {"_raw": text}
    return parsed if isinstance(parsed, dict) else {"_raw": text}
