"""One module of typed models per wire format ("dialect"), shared by the HTTP
front and the upstream adapters.

- ``base.py``: what every dialect uses (the strict, lenient-on-unknown-fields
  ``WireModel``; ``Limit`` for contract bounds that are documented here and
  enforced by the inference service; the error wording; the unknown-field
  log; the tool-call argument rules; parts both REST dialects share, ``Tool``).
- ``ollama.py``: Ollama REST (``gateway/ollama/`` and ``backends/ollama/wire.py``).
- ``openai.py``: OpenAI chat/completions/embeddings/models
  (``gateway/openai/`` and ``backends/cloud/wire.py``).
- ``anthropic.py``: Anthropic Messages (``gateway/anthropic/`` and
  ``backends/cloud/anthropic_wire.py``).

A dialect module holds, in this order: its constants (names, enums, the maps
between its values and the contract's), its request models (``WireModel``
subclasses: parsed once per request), its response shapes (``TypedDict``s:
rendered as plain dicts, never validated per chunk).  It imports only
pydantic, the standard library and ``mlxgate.limits`` / ``jsonutil`` /
``durations``.  Adding a dialect (OpenAI Responses, ...) is
a new module here, a translator and a route table under ``gateway/``, and,
if an upstream speaks it, an adapter under ``backends/``: see
docs/architecture.md, "Adding a dialect".
"""
