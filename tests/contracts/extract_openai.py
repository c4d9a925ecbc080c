"""Extract from OpenAI's published OpenAPI document the operations mlxgate implements.

OpenAI's ``openapi.yaml`` (github.com/openai/openai-openapi) is ~3 MB; the contract test
needs only the operations mlxgate serves under ``/v1`` and the closure of the components
they ``$ref``.  This writes ``tests/contracts/openai-openapi.yaml`` with a header naming
the source (repository, commit, date) so it can be redone:

    git clone https://github.com/openai/openai-openapi && cd openai-openapi
    python <mlxgate>/tests/contracts/extract_openai.py openapi.yaml \\
        --commit "$(git rev-parse HEAD)" --date "$(git log -1 --format=%cs)"

Everything is copied verbatim (the spec's own mistakes included: the contract test names
them in its table of deviations instead of this script fixing them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

import yaml

#: The operations mlxgate implements, by path (as OpenAI writes it, under /v1) and method.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "/chat/completions": ("post",),
    "/completions": ("post",),
    "/embeddings": ("post",),
    "/models": ("get",),
    "/models/{model}": ("get",),
    "/responses": ("post",),
    "/responses/{response_id}": ("get", "delete"),
    "/responses/{response_id}/input_items": ("get",),
}

OUT = Path(__file__).with_name("openai-openapi.yaml")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, methods in OPERATIONS.items():
        item = spec["paths"][path]
        paths[path] = {m: item[m] for m in methods}
        if "parameters" in item:
            paths[path]["parameters"] = item["parameters"]
    components: dict[str, dict[str, Any]] = {}
    todo = list(_refs(paths))
    while todo:
        ref = todo.pop()
        section, name = ref.removeprefix("#/components/").split("/", 1)
        if name in components.get(section, {}):
            continue
        node = spec["components"][section][name]
        components.setdefault(section, {})[name] = node
        todo.extend(_refs(node))
    out = {k: spec[k] for k in ("openapi", "info", "servers") if k in spec}
    out["paths"] = paths
    if "securitySchemes" in spec.get("components", {}):
        components["securitySchemes"] = spec["components"]["securitySchemes"]
    out["components"] = {k: dict(sorted(v.items())) for k, v in sorted(components.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path, help="openapi.yaml of github.com/openai/openai-openapi")
    ap.add_argument("--commit", required=True, help="the commit the spec was read from")
    ap.add_argument("--date", required=True, help="that commit's date")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    spec = yaml.safe_load(a.spec.read_text())
    doc = extract(spec)
    header = (
        "# OpenAI's published OpenAPI document, only the operations mlxgate implements\n"
        f"# ({', '.join(f'{m.upper()} {p}' for p, ms in OPERATIONS.items() for m in ms)})\n"
        "# and the closure of the components they $ref, copied verbatim.\n"
        "# Source: https://github.com/openai/openai-openapi, file openapi.yaml,\n"
        f"# commit {a.commit} ({a.date}), info.version {spec['info']['version']}.\n"
        "# Regenerate with tests/contracts/extract_openai.py (see its docstring); do not edit by hand.\n"
    )
    a.out.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120))


if __name__ == "__main__":
    main()
