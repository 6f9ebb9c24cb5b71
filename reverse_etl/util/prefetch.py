"""Run a producer in a background thread, a few items ahead of its consumer.

DuckDB and Arrow release the GIL, so reading and transforming batch N+1 overlaps with
building and sending batch N: the two cores both work. Errors in the producer are raised in
the consumer, and closing the consumer stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar, cast

T = TypeVar("T")
_DONE = object()


def prefetch(source: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

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
                if not put(item):
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
            yield cast(T, item)  # anything else put on the queue is the source's item
    finally:
        stop.set()
        thread.join()  # the producer checks `stop` between items, so this is one item's wait


def close(iterator: Iterator[Any]) -> None:
    """Close a generator now, so its ``finally`` blocks run (a cursor released, a file
    closed) before what it read from is; other iterators have nothing to close."""
    done = getattr(iterator, "close", None)
    if done is not None:
        done()
