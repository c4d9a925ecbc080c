"""Giving memory back to the OS after a large request.

A 25 MB prompt passes through several buffers (gRPC's, protobuf's, Python's
strings) that live in different threads' malloc arenas; glibc keeps freed
arena memory for reuse, so without help each large request leaves the
process tens of megabytes larger until the arenas happen to be reused.
``trim_after_large`` first collects garbage (a request that failed leaves
exception/traceback cycles holding its buffers until the cyclic collector
runs, which a quiet server may not do for a long time), then asks glibc to
hand free pages back (``malloc_trim``), once a request of at least
``LARGE_REQUEST_BYTES`` is over, at most once per ``MIN_INTERVAL_S``.  Used
by the HTTP front and the inference service alike.  A leaf module.

``freeze_startup_objects`` is the other end of the same collector: what a
process built to start (modules, configuration, routes, models' Python
objects) lives as long as the process, so once it serves, those objects are
moved out of the cyclic collector's reach and each collection only walks
what requests made (about 3 % more requests/s on the gateway hop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

#: Requests at least this large (serialized) are followed by a trim.
LARGE_REQUEST_BYTES = 4 * 1024 * 1024
MIN_INTERVAL_S = 0.5
#: Pause between a large request's end and the trim.
SETTLE_S = 0.05
#: glibc's M_ARENA_MAX: fewer arenas, less memory held per thread.
_M_ARENA_MAX = -8


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 - glibc only
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def limit_arenas(count: int = 2) -> None:
    """Cap glibc's malloc arenas (call before threads start): each thread that
    touches a large buffer would otherwise keep its own arena's free memory."""
    if _LIBC is not None:
        try:
            _LIBC.mallopt(_M_ARENA_MAX, count)
        except AttributeError:
            pass


def _trim() -> None:
    gc.collect()
    if _LIBC is None:
        return
    try:
        _LIBC.malloc_trim(0)
    except Exception:  # noqa: BLE001 - best effort
        log.debug("malloc_trim failed", exc_info=True)


class _Trimmer:
    """One daemon thread that trims after large requests: requests ending close
    together share one trim, and the last one is always followed by a trim
    (its buffers are freed only after it answered)."""

    def __init__(self) -> None:
        self._wanted = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def request(self) -> None:
        self._wanted.set()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while self._wanted.wait(timeout=60):
            self._wanted.clear()
            # Let the request's last references go (the answer is being written).
            time.sleep(SETTLE_S)
            _trim()
            time.sleep(MIN_INTERVAL_S)


_trimmer = _Trimmer()


def trim_after_large(nbytes: int) -> None:
    """Hand free memory back to the OS when a request of ``nbytes`` was large (off the event loop)."""
    if nbytes >= LARGE_REQUEST_BYTES:
        _trimmer.request()


def resident_memory_bytes() -> int:
    """RSS of this process (Linux /proc; macOS via resource's peak as a fallback)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def freeze_startup_objects() -> None:
    """Collect the start-up garbage, then freeze what is left (``gc.freeze``):
    called once a process serves."""
    gc.collect()
    gc.freeze()
