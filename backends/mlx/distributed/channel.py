"""The ranks' group and rank 0's broadcast to the others (``all_sum`` of a
buffer, as mlx_lm.server does it; messages are JSON, never pickle)."""

from __future__ import annotations

import json
from typing import Any

#: Bytes of the first collective of every message (most fit in it).
HEADER_BYTES = 512

_GROUP = None


def group():
    """This process's group (``mx.distributed.init``, once)."""
    global _GROUP
    if _GROUP is None:
        import mlx.core as mx

        _GROUP = mx.distributed.init()
    return _GROUP


class Channel:
    """Rank 0 sends JSON messages to every other rank through ``all_sum``."""

    def __init__(self, grp) -> None:
        self.group = grp
        self.rank = grp.rank()
        #: The generators' stream.  Their last step left the next forward pass
        #: (and its collectives) running asynchronously there: a message's
        #: collective must not be paired with one of those on another rank,
        #: so each message first waits for that stream.
        self.stream = None

    def _all_sum(self, buf):
        import mlx.core as mx

        out = mx.distributed.all_sum(buf, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def send(self, message: Any) -> None:
        import mlx.core as mx
        import numpy as np

        data = json.dumps(message, separators=(",", ":")).encode()
        if self.stream is not None:
            mx.synchronize(self.stream)
        n = len(data)
        head = np.zeros(HEADER_BYTES, dtype=np.uint8)
        head[:4] = np.frombuffer(n.to_bytes(4, "little"), dtype=np.uint8)
        first = data[: HEADER_BYTES - 4]
        head[4 : 4 + len(first)] = np.frombuffer(first, dtype=np.uint8)
        self._all_sum(mx.array(head))
        if n > len(first):
            self._all_sum(mx.array(np.frombuffer(data[len(first) :], dtype=np.uint8)))

    def receive(self) -> Any:
        import mlx.core as mx
        import numpy as np

        if self.stream is not None:
            mx.synchronize(self.stream)
        head = np.array(self._all_sum(mx.zeros(HEADER_BYTES, dtype=mx.uint8)), copy=False)
        n = int.from_bytes(head[:4].tobytes(), "little")
        data = head[4 : 4 + min(n, HEADER_BYTES - 4)].tobytes()
        if n > len(data):
            rest = self._all_sum(mx.zeros(n - len(data), dtype=mx.uint8))
            data += np.array(rest, copy=False).tobytes()
        return json.loads(data)


def tokens_digest(responses) -> int:
    """What a step produced, as one number every rank can compare."""
    return hash(tuple((r.uid, r.token) for r in responses)) & 0xFFFF_FFFF
