"""Prepare batches ahead of the training loop in a background thread, with a bounded queue."""
from __future__ import annotations

import queue
import threading
from dataclasses import fields, is_dataclass
from typing import Iterable, Iterator

import torch

_END = object()


def _pin(batch):
    """Pin the tensors of a (possibly nested) dataclass batch, in place."""
    if is_dataclass(batch):
        for f in fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, torch.Tensor):
                setattr(batch, f.name, v.pin_memory())
            elif is_dataclass(v):
                _pin(v)
    return batch


class Prefetcher:
    """Iterates ``source`` in a daemon thread, at most ``depth`` batches ahead; re-raises its errors here.

    Tensors of dataclass batches are pinned when ``pin`` is set, so host-to-device copies can overlap.
    """

    def __init__(self, source: Iterable, depth: int = 4, pin: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._source = source
        self._pin = pin
        self._thread = threading.Thread(target=self._run, daemon=True, name="speedyrec-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._source:
                if not self._put(_pin(batch) if self._pin else batch):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)
            return
        self._put(_END)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def prefetch(source: Iterable, depth: int = 4, pin: bool = False) -> Prefetcher:
    return Prefetcher(source, depth, pin)
