"""How the verbs print what the server answers, as Ollama's CLI prints it
(cmd/cmd.go, format/bytes.go, format/time.go): sizes in decimal units,
times as "2 hours ago", left-aligned tables padded with four spaces."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Iterable, Optional, Sequence


def human_bytes(n: int) -> str:
    """Ollama's format.HumanBytes: 4.7 GB, 693 KB, 12 B."""
    for unit, size in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= size:
            value = n / size
            if value >= 10 or value == math.trunc(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    """Ollama's humanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds // 3600) // 24 // 365} years"


def parse_time(value: Any) -> Optional[datetime]:
    """An RFC 3339 time from the wire (Go writes nanoseconds and ``Z``); None if absent or unreadable."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = value.replace("Z", "+00:00")
    date, dot, rest = text.partition(".")
    if dot:  # Python reads at most 6 fraction digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{date}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def human_time(value: Any, zero: str, now: Optional[datetime] = None) -> str:
    """Ollama's format.HumanTime: "2 hours ago", "4 minutes from now", ``zero`` for no time."""
    t = parse_time(value)
    if t is None:
        return zero
    delta = ((now or datetime.now(timezone.utc)) - t).total_seconds()
    if delta / 3600 / 24 / 365 < -20:
        return "Forever"
    if delta < 0:
        return _duration(-delta) + " from now"
    return _duration(delta) + " ago"


def table(header: Optional[Sequence[str]], rows: Iterable[Sequence[str]]) -> str:
    """Columns left-aligned, four spaces apart, no borders (Ollama's tablewriter settings)."""
    lines = ([list(header)] if header else []) + [list(r) for r in rows]
    if not lines:
        return ""
    width = max(len(r) for r in lines)
    widths = [max((len(r[i]) for r in lines if i < len(r)), default=0) for i in range(width)]
    out = []
    for r in lines:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(r)]
        out.append("    ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def models_table(models: list[dict[str, Any]], prefix: str = "") -> str:
    """``mlxgate list``: NAME, ID, SIZE, MODIFIED, the models whose name starts with ``prefix``."""
    rows = [
        [m.get("name", ""), str(m.get("digest") or "")[:12], human_bytes(int(m.get("size") or 0)),
         human_time(m.get("modified_at"), "Never")]
        for m in models
        if str(m.get("name", "")).lower().startswith(prefix.lower())
    ]
    return table(["NAME", "ID", "SIZE", "MODIFIED"], rows)


def _processor(size: int, vram: int) -> str:
    if vram == 0:
        return "100% CPU"
    if vram == size:
        return "100% GPU"
    if vram > size or size == 0:
        return "Unknown"
    cpu = round((size - vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def running_table(models: list[dict[str, Any]], prefix: str = "", now: Optional[datetime] = None) -> str:
    """``mlxgate ps``: NAME, ID, SIZE, PROCESSOR, CONTEXT, UNTIL."""
    now = now or datetime.now(timezone.utc)
    rows = []
    for m in models:
        if not str(m.get("name", "")).startswith(prefix):
            continue
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        expires = parse_time(m.get("expires_at"))
        until = "Stopping..." if expires is not None and expires < now else human_time(m.get("expires_at"), "Never",
                                                                                         now)
        rows.append([m.get("name", ""), str(m.get("digest") or "")[:12], human_bytes(size), _processor(size, vram),
                     str(m.get("context_length") or 0), until])
    return table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows)


def _section(title: str, rows: list[list[str]]) -> str:
    return f"  {title}\n" + table(None, rows) + "\n"


def _head(text: str, n: int) -> list[list[str]]:
    """The first ``n`` non-blank lines of ``text``, "..." when there are more."""
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    rows = [["", t] for t in lines[:n]]
    return rows + [["", "..."]] if len(lines) > n else rows


def _number(v: Any) -> str:
    return str(int(v)) if isinstance(v, (int, float)) and float(v).is_integer() else str(v)


def show_info(resp: dict[str, Any]) -> str:
    """``mlxgate show NAME``: Model, Capabilities, Parameters, System, License (Ollama's showInfo)."""
    details = resp.get("details") or {}
    info = resp.get("model_info") or {}
    rows: list[list[str]] = []
    if info:
        arch = info.get("general.architecture") or ""
        if arch:
            rows.append(["", "architecture", str(arch)])
        params = details.get("parameter_size") or ""
        if params:
            rows.append(["", "parameters", str(params)])
        for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
            if f"{arch}.{key}" in info:
                rows.append(["", label, _number(info[f"{arch}.{key}"])])
    else:
        rows.append(["", "architecture", str(details.get("family", ""))])
        rows.append(["", "parameters", str(details.get("parameter_size", ""))])
    rows.append(["", "quantization", str(details.get("quantization_level", ""))])
    out = _section("Model", rows)
    if resp.get("capabilities"):
        out += _section("Capabilities", [["", str(c)] for c in resp["capabilities"]])
    if resp.get("parameters"):
        out += _section("Parameters", [["", *line.split()] for line in str(resp["parameters"]).splitlines()
                                       if line.strip()])
    if resp.get("system"):
        out += _section("System", _head(str(resp["system"]), 2))
    if resp.get("license"):
        out += _section("License", _head(str(resp["license"]), 2))
    return out
