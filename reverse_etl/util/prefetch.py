"""Run a producer in a background thread, a few items ahead of its consumer.

DuckDB and Arrow release the GIL, so reading and transforming batch N+1 overlaps with
building and sending batch N: the two cores both work. Errors in the producer are raised in
the consumer, and closing the consumer stops the producer. The items waiting are bounded in
number (``depth``) and, given their ``size``, in bytes (``max_bytes``): a view of wide rows
must not hold two batches of hundreds of MB each; one item always fits, however large.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar, cast

T = TypeVar("T")
_DONE = object()


def prefetch(
    source: Iterator[T],
    depth: int = 2,
    *,
    max_bytes: int | None = None,
    size: Callable[[T], int] | None = None,
) -> Generator[T, None, None]:
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    room = threading.Condition()
    held = [0]  # bytes of the items queued, not yet taken

    def wait_for_room(nbytes: int) -> bool:
        """Block while the queued items and this one would pass ``max_bytes`` (an item alone
        always fits); False when the consumer has gone."""
        with room:
            while held[0] and held[0] + nbytes > (max_bytes or 0) and not stop.is_set():
                room.wait(timeout=0.1)
            held[0] += nbytes
        return not stop.is_set()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                nbytes = size(item) if size is not None and max_bytes is not None else 0
                if nbytes and not wait_for_room(nbytes):
                    return
                if not put((item, nbytes)):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            close(source)

    thread = threading.Thread(target=produce, name="reverse-etl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            value, nbytes = cast(tuple[T, int], item)  # anything else: (item, its bytes)
            if nbytes:
                with room:
                    held[0] -= nbytes
                    room.notify()
            del item
            yield value
            del value
    finally:
        stop.set()
        thread.join()  # the producer checks `stop` between items, so this is one item's wait


def close(iterator: Iterator[Any]) -> None:
    """Close a generator now, so its ``finally`` blocks run (a cursor released, a file
    closed) before what it read from is; other iterators have nothing to close."""
    done = getattr(iterator, "close", None)
    if done is not None:
        done()
