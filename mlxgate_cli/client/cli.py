"""The client verbs on the command line: their argparse parsers (added to
``mlxgate``'s by ``main.py``) and ``run_verb``, which calls one and turns
every failure into one line on stderr and an exit status: 1 for an error,
130 for Ctrl-C, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, TextIO

from mlxgate.config import CLIENT_KEY_ENV
from mlxgate_cli.client import chat, commands, create
from mlxgate_cli.client.api import ApiError, OllamaAPI
from mlxgate_cli.client.host import SERVER_VARIABLES, HostError, settings_from_env
from mlxgate_cli.client.modelfile import ModelfileError

SERVER_NOTE = (f"talks to the server at {SERVER_VARIABLES} (default 127.0.0.1:11434), "
               f"with {CLIENT_KEY_ENV} as its key")


def _verb(sub: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}; {SERVER_NOTE}.", **kw)
    p.set_defaults(verb=name)
    return p


def add_verbs(sub: Any) -> None:
    """pull, list (ls), ps, show, cp, rm, create, run, stop."""
    p = _verb(sub, "pull", "pull a model from a registry (the server downloads it)")
    p.add_argument("name", help="model name, e.g. llama3.2:1b or hf.co/owner/repo")
    p.add_argument("--insecure", action="store_true", help="accepted and ignored, as by Ollama")

    p = _verb(sub, "list", "list the server's models", aliases=["ls"])
    p.add_argument("prefix", nargs="?", default="", help="only the models whose name starts with this")

    p = _verb(sub, "ps", "list the models loaded now")
    p.add_argument("prefix", nargs="?", default="", help="only the models whose name starts with this")

    p = _verb(sub, "show", "show a model's information")
    p.add_argument("name")
    one = p.add_mutually_exclusive_group()
    for field in commands.SHOW_FIELDS:
        one.add_argument(f"--{field}", dest="field", action="store_const", const=field,
                         help=f"print only the model's {field}")

    p = _verb(sub, "cp", "copy a model (a second name for it)")
    p.add_argument("source")
    p.add_argument("destination")

    p = _verb(sub, "rm", "remove models")
    p.add_argument("names", nargs="+", metavar="name")

    p = _verb(sub, "create", "create a model from a Modelfile")
    p.add_argument("name")
    p.add_argument("-f", "--file", metavar="MODELFILE",
                   help="the Modelfile (default: ./Modelfile, else FROM . )")
    p.add_argument("-q", "--quantize", metavar="LEVEL", help="quantize the model, e.g. q4_K_M, q8_0")

    p = _verb(sub, "run", "chat with a model: one answer to PROMPT, or a chat read line by line from stdin")
    p.add_argument("name")
    p.add_argument("prompt", nargs="*", help="the message (words are joined with spaces); none: a chat")

    p = _verb(sub, "stop", "unload a model now")
    p.add_argument("name")


VERBS = ("pull", "list", "ps", "show", "cp", "rm", "create", "run", "stop")


def _dispatch(api: OllamaAPI, args: argparse.Namespace, stdin: TextIO, out: TextIO,
              err: TextIO) -> Callable[[], None]:
    """The verb's call, its arguments taken out of the Namespace here."""
    return {
        "pull": lambda: commands.pull(api, args.name, err),
        "list": lambda: commands.list_models(api, args.prefix, out),
        "ps": lambda: commands.list_running(api, args.prefix, out),
        "show": lambda: commands.show(api, args.name, args.field, out),
        "cp": lambda: commands.copy(api, args.source, args.destination, out),
        "rm": lambda: commands.remove(api, args.names, out, err),
        "create": lambda: create.create(api, args.name, args.file, args.quantize, err),
        "run": lambda: chat.run(api, args.name, " ".join(args.prompt) if args.prompt else None, stdin, out, err),
        "stop": lambda: commands.stop(api, args.name),
    }[args.verb]


def run_verb(args: argparse.Namespace) -> int:
    """Run the verb ``args`` names; its exit status."""
    out, err = sys.stdout, sys.stderr
    try:
        api = OllamaAPI(settings_from_env(os.environ))
        _dispatch(api, args, sys.stdin, out, err)()
    except KeyboardInterrupt:
        out.flush()
        print("interrupted", file=err)
        return 130
    except ApiError as e:
        out.flush()
        hint = f" (the key is read from {CLIENT_KEY_ENV})" if e.status in (401, 403) else ""
        print(f"Error: {e}{hint}", file=err)
        return 1
    except (HostError, ModelfileError, create.CreateError) as e:
        print(f"Error: {e}", file=err)
        return 1
    except BrokenPipeError:  # `mlxgate list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
