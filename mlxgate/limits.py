"""The contract's bounds: what one request may ask for, in one place.

Every request reaching the inference service (from the HTTP front or from any
gRPC client) is checked against these before routing (``backends/accept.py``),
so no backend sees a request whose cost is not bounded.  The HTTP front uses
the same numbers where a limit belongs to parsing (JSON depth, ``n``).  The
README's "Limits" table and the proto comments document them.

A leaf module: it imports nothing of the project, so the front and the
backends can both use it.
"""

from __future__ import annotations

from typing import Optional

#: Longest model name (Ollama's names are far shorter; this only stops abuse).
MAX_MODEL_NAME_CHARS = 256
#: Stop sequences per request, and the longest one.  Every generated token is
#: checked against each stop string, so the count multiplies decode cost.
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 1024
#: Messages in one chat (agents with long histories stay well below).
MAX_MESSAGES = 4096
#: Tools offered in one request, and the longest tool name.
MAX_TOOLS = 256
MAX_TOOL_NAME_CHARS = 256
#: Tool calls in one assistant message.
MAX_TOOL_CALLS = 256
#: Images in one request (all messages together).
MAX_IMAGES = 32
#: Bytes of one image as sent (decoded from base64); OpenAI's cap.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
#: Pixels of one image (width x height), read from its header before anything
#: is decoded: a 30,000 x 30,000 PNG is ~100 kB on the wire and 2.7 GB as RGB.
#: A 48-megapixel phone photo (8064 x 6048) fits.
MAX_IMAGE_PIXELS = 50_000_000
#: Pixels of all the images of one request together (each is decoded, then
#: shrunk to the model's size, one after the other: this bounds the time).
MAX_REQUEST_IMAGE_PIXELS = 200_000_000
#: Image formats accepted (Pillow's names), as OpenAI and Anthropic accept them.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
#: Inputs of one embeddings request (OpenAI's limit).
MAX_EMBED_INPUTS = 2048
#: Generations one HTTP request may start (n, times the prompts of /v1/completions).
MAX_CHOICES = 128
#: Alternatives per token when logprobs are asked for.
MAX_TOP_LOGPROBS = 20
#: Nesting depth of any JSON the server parses (request bodies, schemas, tool arguments).
MAX_JSON_DEPTH = 64
#: Request ids callers may set (echoed in headers and logs).
MAX_REQUEST_ID_CHARS = 128
#: The ranges of the contract's sampling knobs (SamplingParams in the .proto):
#: name -> (lowest, highest, whether the lowest itself is excluded).  The
#: service enforces them (backends/accept.py); the dialect models state
#: them in /openapi.json (mlxgate.dialects.base.contract_range).
SAMPLING_RANGES: dict[str, tuple[Optional[float], Optional[float], bool]] = {
    "temperature": (0, None, False),
    "top_p": (0, 1, False),  # 0 keeps only the most likely token: greedy
    "top_k": (0, None, False),
    "min_p": (0, 1, False),
    "repeat_penalty": (0, None, True),
    "repeat_last_n": (-1, None, False),
    "presence_penalty": (-2, 2, False),
    "frequency_penalty": (-2, 2, False),
    # max_tokens: any value; negative is "no limit" (until a stop or the context is full).
    "num_ctx": (1, None, False),
    "typical_p": (0, 1, True),
}
#: Rerank: documents in one request (Cohere's and Voyage's limit), the tokens
#: of all of them together once each is cut to the context (a causal model's
#: judging prompt and the query count with every document), and the longest
#: task instruction.
MAX_RERANK_DOCUMENTS = 1000
MAX_RERANK_TOKENS = 262_144
MAX_RERANK_INSTRUCTION_CHARS = 4096
#: Token ids in one detokenize request.
MAX_DETOKENIZE_TOKENS = 262_144
#: A keep_alive longer than this means "keep loaded" (Ollama's forever is Go's
#: largest duration, ~292 years); also keeps expiry dates inside datetime's range.
KEEP_ALIVE_FOREVER_S = 290 * 365 * 24 * 3600.0
#: Longest error message put in a gRPC status or an HTTP error body; longer
#: ones are cut (a status message travels in gRPC metadata, which is bounded).
MAX_ERROR_CHARS = 1024
#: Model names listed in a "model not found" message (the full list is /api/tags).
MAX_NAMES_IN_ERROR = 10


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 15)] + "… (truncated)"


def clip_name(name: str, limit: int = 80) -> str:
    """A caller-supplied name as it may appear inside a message."""
    return name if len(name) <= limit else name[:limit] + "…"
