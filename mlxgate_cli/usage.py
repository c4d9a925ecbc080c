"""``mlxgate usage``: what a running server's ledger and budgets say, as a table or JSON.

It asks ``GET /api/usage`` of the server at ``MLXGATE_HOST`` / ``OLLAMA_HOST``
(``--host`` wins; default http://127.0.0.1:11434) with ``MLXGATE_API_KEY``
(an admin key when the server has keys).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping, Optional

from mlxgate.config import parse_ollama_host

COLUMNS = ("key", "backend", "model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")


def server_url(host: Optional[str], env: Mapping[str, str]) -> str:
    value = host or env.get("MLXGATE_HOST") or env.get("OLLAMA_HOST") or ""
    if value.startswith(("http://", "https://")):
        scheme = value.split("://", 1)[0]
    else:
        scheme = "http"
    h, port = parse_ollama_host(value) if value else ("127.0.0.1", None)
    if h in ("0.0.0.0", "::", ""):
        h = "127.0.0.1"
    if ":" in h:
        h = f"[{h}]"
    return f"{scheme}://{h}:{port or 11434}"


def table(answer: dict) -> str:
    rows = [[str(g[c]) if c != "cost_usd" else f"{g[c]:.4f}" for c in COLUMNS] for g in answer["by"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    if not rows:
        lines.append("(no requests recorded)")
    lines.append("")
    lines.append("budget   spent_usd  limit_usd  resets_at")
    for scope, b in answer["budget"].items():
        limit = "-" if b["limit_usd"] is None else f"{b['limit_usd']:.2f}"
        lines.append(f"{scope:<8} {b['spent_usd']:>9.4f}  {limit:>9}  {b['resets_at']}")
    return "\n".join(lines)


def run(host: Optional[str], since: Optional[str], until: Optional[str], group_by: Optional[str], as_json: bool,
        env: Mapping[str, str]) -> int:
    query = {k: v for k, v in (("since", since), ("until", until), ("group_by", group_by)) if v}
    url = f"{server_url(host, env)}/api/usage"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    req = urllib.request.Request(url)
    key = env.get("MLXGATE_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error", e.reason)
        except ValueError:
            message = e.reason
        print(f"mlxgate usage: {e.code} {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"mlxgate usage: cannot reach {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if as_json else table(answer))
    return 0
