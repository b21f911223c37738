"""Stored responses of the OpenAI Responses API (`store: true`): the response object, the
conversation it answered and its output, for `previous_response_id` and GET / DELETE
/v1/responses/{id}. In memory, bounded by count and bytes (config `responses:`); the oldest
go first. Lost at restart: a client that must survive one sends the whole input (store: false).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import orjson

from ..config import ResponsesConfig


@dataclass(frozen=True)
class Stored:
    """One stored response: its object, the items it answered and the items it made."""

    response: dict[str, Any]
    conversation: tuple[dict[str, Any], ...]
    output: tuple[dict[str, Any], ...]
    nbytes: int

    @property
    def items(self) -> tuple[dict[str, Any], ...]:
        """The conversation as a next turn continues it: its input, then its output."""
        return self.conversation + self.output


class ResponseStore:
    """A bounded, in-memory map of response id -> Stored (oldest dropped first)."""

    def __init__(self, cfg: ResponsesConfig) -> None:
        self.max_items = cfg.store_max
        self.max_bytes = cfg.store_max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(
        self,
        response: dict[str, Any],
        conversation: tuple[dict[str, Any], ...],
        output: tuple[dict[str, Any], ...],
    ) -> bool:
        """Keep a response; False when the limits leave no room for it (0, or too big)."""
        nbytes = len(orjson.dumps([response, conversation]))
        if self.max_items <= 0 or nbytes > self.max_bytes:
            return False
        rid = str(response["id"])
        with self._lock:
            old = self._items.pop(rid, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[rid] = Stored(response, conversation, output, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes
        return True

    def get(self, rid: str) -> Optional[Stored]:
        with self._lock:
            return self._items.get(rid)

    def delete(self, rid: str) -> bool:
        with self._lock:
            old = self._items.pop(rid, None)
            if old is None:
                return False
            self._bytes -= old.nbytes
            return True
