"""The Responses API's store, no model: LRU under a count and a byte budget, and the directory
mirror (0600 files in a 0700 directory, written atomically, read back on start)."""

from __future__ import annotations

import pytest

from mlxrun.server.responses_store import ResponseStore, StoredResponse

pytestmark = pytest.mark.pure


def _record(i: int, size: int = 10) -> StoredResponse:
    return StoredResponse({"id": f"resp_{i}", "output": ["x" * size]}, [])


def test_store_is_bounded_lru(tmp_path):
    store = ResponseStore(max_responses=3)
    for i in range(3):
        store.put(_record(i))
    store.get("resp_0")  # used: resp_1 is now the oldest
    store.put(_record(3))
    assert [store.get(f"resp_{i}") is not None for i in range(4)] == [True, False, True, True]
    small = ResponseStore(max_bytes=400)  # a record is ~160 bytes
    for i in range(5):
        small.put(_record(i, 100))
    assert len(small) == 2 and small.bytes <= 400


def test_store_persists_privately_and_atomically(tmp_path):
    directory = tmp_path / "responses"
    store = ResponseStore(directory, max_responses=2)
    for i in range(3):
        store.put(_record(i))
    assert directory.stat().st_mode & 0o777 == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["resp_1.json", "resp_2.json"]  # the evicted one's file is gone
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    (directory / "resp_9.json").write_text("{half")  # a torn file is skipped, not fatal
    again = ResponseStore(directory)
    assert again.get("resp_2").response["output"] == ["x" * 10] and again.get("resp_9") is None
    again.delete("resp_2")
    assert not (directory / "resp_2.json").exists()


def test_replacing_and_oversized_records():
    store = ResponseStore(max_bytes=1000)
    store.put(_record(1, 100))
    first = store.bytes
    store.put(_record(1, 300))  # the same id again: replaced, counted once
    assert len(store) == 1 and store.bytes > first
    store.put(_record(2, 5000))  # larger than the whole budget: not kept, nothing evicted
    assert store.get("resp_2") is None and store.get("resp_1") is not None
    assert store.delete("resp_1") and not store.delete("resp_1") and store.bytes == 0
