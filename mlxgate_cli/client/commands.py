"""The model verbs: pull, list, ps, show, cp, rm, stop, as Ollama's CLI
does them (cmd/cmd.go), each one or two requests to the server.  Failures
are ``ApiError``s; ``cli`` prints them."""

from __future__ import annotations

from typing import Optional, TextIO

from mlxgate_cli.client import display
from mlxgate_cli.client.api import ApiError, OllamaAPI
from mlxgate_cli.client.progress import Progress

#: ``show``'s one-field flags, in Ollama's order.
SHOW_FIELDS = ("license", "modelfile", "parameters", "system", "template")


def pull(api: OllamaAPI, name: str, err: TextIO) -> None:
    """``POST /api/pull``, its progress drawn on ``err`` until ``success``."""
    progress = Progress.on(err)
    try:
        for obj in api.stream("/api/pull", {"model": name}):
            progress.update(obj)
    finally:
        progress.close()


def list_models(api: OllamaAPI, prefix: str, out: TextIO) -> None:
    out.write(display.models_table(api.get("/api/tags").get("models") or [], prefix))


def list_running(api: OllamaAPI, prefix: str, out: TextIO) -> None:
    out.write(display.running_table(api.get("/api/ps").get("models") or [], prefix))


def show(api: OllamaAPI, name: str, field: Optional[str], out: TextIO) -> None:
    """The model's summary, or one field of ``/api/show`` as it is (``--modelfile`` ...)."""
    resp = api.post("/api/show", {"model": name})
    if field is None:
        out.write(display.show_info(resp))
        return
    value = str(resp.get(field) or "")
    # Ollama prints the system and template as they are, the others with a newline.
    out.write(value if field in ("system", "template") else value + "\n")


def copy(api: OllamaAPI, source: str, destination: str, out: TextIO) -> None:
    api.post("/api/copy", {"source": source, "destination": destination})
    print(f"copied '{source}' to '{destination}'", file=out)


def stop(api: OllamaAPI, name: str) -> None:
    """Unload ``name`` now (``keep_alive: 0``)."""
    try:
        api.post("/api/generate", {"model": name, "keep_alive": 0})
    except ApiError as e:
        if e.status == 404:
            raise ApiError(f'couldn\'t find model "{name}" to stop', e.status) from None
        raise


def remove(api: OllamaAPI, names: list[str], out: TextIO, err: TextIO) -> None:
    """Each model unloaded first, as Ollama does, then ``DELETE /api/delete``."""
    for name in names:
        try:
            stop(api, name)
        except ApiError as e:
            if e.status != 404:
                print(f"Warning: unable to stop model '{name}'", file=err)
        api.delete("/api/delete", {"model": name})
        print(f"deleted '{name}'", file=out)
