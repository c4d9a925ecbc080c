"""The command line's client verbs (pull, list, ps, show, cp, rm, create, run,
stop): Ollama's CLI, talking to a running server over HTTP in Ollama's wire
format, so the same verbs work against mlxgate and against a real Ollama.

``host`` says where the server is, ``api`` speaks HTTP to it, ``modelfile``
reads Modelfiles, ``progress`` and ``display`` draw what comes back,
``commands``, ``create`` and ``chat`` are the verbs, ``cli`` wires them into
argparse.  Nothing here imports the server side (gateway, backends).
"""
