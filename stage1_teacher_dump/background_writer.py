"""A background thread that encodes and writes cache samples while the teacher runs the next batch.

Why a thread and not a process: compression in zarr's codecs (zstd, blosc) and numpy casts release the
GIL, so one thread overlaps them with the teacher's forward pass without pickling feature tensors
between processes. The queue is bounded so a slow disk applies back-pressure instead of filling RAM.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    """Runs `write_fn(item)` for each submitted item on one worker thread, in submission order.

    An exception raised by `write_fn` stops the worker; it is re-raised in the submitting thread at
    the next `submit` or at `close`, so a full disk or a corrupt store is never silently dropped.
    """

    def __init__(self, write_fn: Callable[[Any], None], max_pending: int = 4) -> None:
        self._write_fn = write_fn
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._write_fn(item)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        """Queue one item; blocks while `max_pending` items are waiting (back-pressure)."""
        self._raise_if_failed()
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait for every submitted item to be written, stop the thread, re-raise a worker error."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()
