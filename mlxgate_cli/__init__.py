"""mlxgate's composition root and command line.

The one package that knows every other one: it builds the backends, the
router, the gRPC service and the HTTP front from a ``Config``
(``stack.py``, ``factory.py``) and parses the command line (``main.py``).
Nothing imports it (docs/architecture.md, "Layers").
"""
