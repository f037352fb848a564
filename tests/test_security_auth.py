"""Named keys and per-key limits, without a server: parsing, digests, reloads, slots and queues."""

from __future__ import annotations

import asyncio

import pytest

from mlxrun.errors import InvalidRequestError
from mlxrun.server.auth import KeyLimits, KeyRing, Principal, parse_key_file
from mlxrun.server.errors import APIError

pytestmark = pytest.mark.pure


def test_key_file_lines_comments_and_mistakes():
    text = "# laptops\n\nalice: key-a \nbob:key:with:colons\n"
    assert parse_key_file(text, "keys") == [("alice", "key-a"), ("bob", "key:with:colons")]
    with pytest.raises(InvalidRequestError, match="keys:2: the name 'alice' is used twice"):
        parse_key_file("alice:a\nalice:b\n", "keys")
    for bad in ("just-a-key", ":no-name", "no-key:"):
        with pytest.raises(InvalidRequestError, match="keys:1: expected `name:key`") as e:
            parse_key_file(bad, "keys")
        assert bad.strip(":") not in e.value.message  # a line's content is never echoed


def test_keys_are_kept_only_as_digests_and_reloaded(tmp_path):
    path = tmp_path / "keys"
    path.write_text("alice:first-secret\n")
    ring = KeyRing([("default", "cli-secret")], path)
    assert ring.lookup(b"first-secret") == Principal("alice")
    assert ring.lookup(b"cli-secret") == Principal("default")
    assert ring.lookup(b"first-secre") is None and ring.lookup(b"") is None
    state = repr(vars(ring))
    assert "first-secret" not in state and "cli-secret" not in state
    path.write_text("alice:second-secret\nbob:bob-secret\n")
    assert ring.reload()
    assert ring.lookup(b"first-secret") is None
    assert ring.lookup(b"second-secret") == Principal("alice") and ring.names == [
        "default", "alice", "bob"
    ]  # fmt: skip
    path.write_text("broken line\n")
    assert not ring.reload()  # a bad edit keeps the keys in force
    assert ring.lookup(b"bob-secret") == Principal("bob")


def test_per_key_slots_queue_then_refuse():
    async def scenario() -> list[str]:
        limits = KeyLimits(running=1, queued=1)
        order: list[str] = []
        await limits.acquire("alice")  # running
        waiting = asyncio.ensure_future(limits.acquire("alice"))  # queued
        await asyncio.sleep(0)
        with pytest.raises(APIError) as e:  # the queue is full: refused at once
            await limits.acquire("alice")
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
        await asyncio.wait_for(limits.acquire("bob"), 1)  # another key is not held up
        order.append("bob ran")
        assert not waiting.done()
        limits.release("alice")
        await asyncio.wait_for(waiting, 1)
        order.append("alice's queued request ran")
        return order

    assert asyncio.run(scenario()) == ["bob ran", "alice's queued request ran"]
