"""Stored responses for the Responses API (`store: true`, `previous_response_id`, GET / DELETE).

A record is the response object as it was sent plus the input items it was made from (the whole
conversation before it, so a later turn continues from it alone). Records are kept in LRU order
under a count and a byte budget; the oldest go first. With a directory they are also written
there, one JSON file each (0600 in a 0700 directory, written to a temporary sibling and renamed),
and read back on start, so a restarted server still continues a conversation.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MAX_RESPONSES = 1000
DEFAULT_MAX_BYTES = 256 << 20
_ID = re.compile(r"^resp_[A-Za-z0-9_-]{1,120}$")  # also keeps file names inside the directory


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object, as GET returns it
    input_items: list[dict[str, Any]]  # every item it read (earlier turns included), with ids
    size: int = 0  # its JSON size in bytes, for the budget
    owner: str = ""  # the API key's owner tag (server.auth.owner): only it may read the record

    def to_json(self) -> bytes:
        return json.dumps(
            {"response": self.response, "input_items": self.input_items, "owner": self.owner},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")


def valid_id(response_id: str) -> bool:
    return bool(_ID.match(response_id))


class ResponseStore:
    """Thread-safe LRU of StoredResponse by id, optionally mirrored in a directory."""

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        max_responses: int = DEFAULT_MAX_RESPONSES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.directory = Path(directory).expanduser() if directory is not None else None
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.running: dict[str, Any] = {}  # id -> asyncio task of a background response
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # mkdir's mode is masked; an old one may be wider
            self._load()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            record = self._items.get(response_id)
            if record is not None:
                self._items.move_to_end(response_id)
            return record

    def put(self, record: StoredResponse) -> None:
        """Store (or replace) a record; older ones leave to keep within the budget. A record
        larger than the whole budget is not kept."""
        data = record.to_json()
        record.size = len(data)
        response_id = record.response["id"]
        with self._lock:
            self._drop(response_id)
            if record.size > self.max_bytes:
                return
            self._items[response_id] = record
            self._bytes += record.size
            self._write(response_id, data)
            while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    # ------------------------------------------------------------ internals (lock held)

    def _drop(self, response_id: str) -> bool:
        record = self._items.pop(response_id, None)
        if record is None:
            return False
        self._bytes -= record.size
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{response_id}.json").unlink()
        return True

    def _write(self, response_id: str, data: builtins.bytes) -> None:
        """Atomically: a reader (or a crash) never sees half a file."""
        if self.directory is None:
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)  # created 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / f"{response_id}.json")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _load(self) -> None:
        """Records from the directory, oldest first (by modification time); unreadable files
        and leftover temporaries are skipped."""
        assert self.directory is not None
        files = sorted(
            (p for p in self.directory.glob("resp_*.json") if valid_id(p.stem)),
            key=lambda p: p.stat().st_mtime_ns,
        )
        for path in files:
            try:
                raw = json.loads(path.read_bytes())
                record = StoredResponse(
                    raw["response"], raw["input_items"], owner=str(raw.get("owner", ""))
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
            record.size = path.stat().st_size
            self._items[path.stem] = record
            self._bytes += record.size
        with self._lock:
            while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
