"""Run an iterator in a background thread a few items ahead (batch joins overlap the training step)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


class Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead; re-raises its exception in the consumer."""

    _END = object()

    def __init__(self, items: Iterator[Any], *, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="mcad-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001 (handed to the consumer thread, which re-raises it)
            self._put(("error", err))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        """Stop the producer (it may have prepared a few batches that are never used)."""
        self._stop.set()
        self._thread.join(timeout=10)


__all__ = ["Prefetcher"]
