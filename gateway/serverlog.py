"""aiohttp's server logger, with a malformed request as one WARNING line.

aiohttp answers a request it cannot parse (a request line or header beyond
its limits, a bad header, ...) with 400 itself, before any middleware runs,
and logs it as ERROR with the parser's traceback: eight lines per request,
which lets any client flood the log.  That is the client's mistake, not the
server's, so ``server_logger()`` (handed to each ``AppRunner`` as
``logger=``) logs it as one WARNING line naming the peer and the reason;
every other exception keeps aiohttp's ERROR with its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

#: Longest part of the parser's message quoted in the log line.
_REASON_MAX = 200


class _ServerLog(logging.LoggerAdapter):
    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            reason = " ".join(str(exc_info.message).split())[:_REASON_MAX]
            peer = args[0] if args else "?"  # aiohttp: "Error handling request from %s", request.remote
            self.warning("malformed HTTP request from %s answered %d: %s", peer, exc_info.code or 400, reason)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def server_logger() -> logging.LoggerAdapter:
    """The logger for ``web.AppRunner(..., logger=server_logger())``."""
    return _ServerLog(logging.getLogger("aiohttp.server"), {})
