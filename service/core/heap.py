"""Hand freed memory back to the OS after a big request.

A request of tens of thousands of texts allocates hundreds of thousands of small objects
(strings, token rows, numpy arrays) in the event-loop thread, the tokenising thread and the
inference threads. Python frees them when the request is answered, but glibc keeps the
freed blocks in its heaps (one arena per thread) and only gives back what lies at the top
of each: the process stayed at its peak RSS (the issue measured 171 MiB -> 1.43 GB, never
released), so a few big requests look like a leak and end in an OOM kill.

``release_memory_soon`` schedules one ``malloc_trim(0)`` (every arena, free pages in the
middle of a heap included) on a short-lived thread shortly after the request, when its objects
are gone; ctypes drops the GIL for the call, so the event loop keeps running. Requests in
the meantime share the one pending release. Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("uniguard.memory")

# Long enough for the response to be written and the request's objects freed.
RELEASE_DELAY_S = 0.5


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()
_lock = threading.Lock()
_pending: asyncio.AbstractEventLoop | None = None  # the loop a release is scheduled on


def release_memory() -> bool:
    """Return the free pages of every malloc arena to the OS (blocking; a few ms). True if
    glibc's ``malloc_trim`` exists and released something."""
    global _pending
    with _lock:
        _pending = None
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


def release_memory_soon(delay_s: float | None = None) -> None:
    """From the event loop: ``release_memory`` on a thread of its own ``delay_s`` (default
    ``RELEASE_DELAY_S``) from now, once however many requests ask before it runs."""
    global _pending
    if _malloc_trim is None:
        return
    loop = asyncio.get_running_loop()
    with _lock:
        if _pending is loop:  # (one on a loop that closed before it ran does not count)
            return
        _pending = loop
    loop.call_later(RELEASE_DELAY_S if delay_s is None else delay_s, _start_release)


def _start_release() -> None:
    # Its own short-lived thread: the default executor may be shut down already (loop closing).
    threading.Thread(target=release_memory, name="uniguard-release-memory", daemon=True).start()
