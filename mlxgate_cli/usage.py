"""``mlxgate usage``: what a running server's ledger and budgets say, as a table or JSON.

It asks ``GET /api/usage`` of the server the client verbs call, with their
key (``mlxgate_cli/client/host.py``; ``--host`` wins; default
http://127.0.0.1:11434), an admin key when the server has keys.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping, Optional

from mlxgate_cli.client.host import ClientSettings, parse_host, settings_from_env

COLUMNS = ("key", "backend", "model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")


def server(host: Optional[str], env: Mapping[str, str]) -> ClientSettings:
    """The server and key from the environment, the server from ``host`` when given."""
    settings = settings_from_env(env)
    if host:
        scheme, h, port, path = parse_host(host)
        settings = dataclasses.replace(settings, scheme=scheme, host=h, port=port, path=path)
    return settings


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
    try:
        target = server(host, env)
    except ValueError as e:  # HostError too
        print(f"mlxgate usage: {e}", file=sys.stderr)
        return 1
    url = f"{target.url}/api/usage"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    req = urllib.request.Request(url)
    if target.api_key:
        req.add_header("Authorization", f"Bearer {target.api_key}")
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
