"""The prefix cache's disk tier (mlxrun.disk_tier): hash-chained segments, sharing, restarts,
torn and foreign files, the byte budget, and (with a tiny model) the engine never waiting on it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time

import mlx.core as mx
import pytest

from mlxrun import kv_files
from mlxrun.cache import KVBlock
from mlxrun.disk_tier import DiskTier, chain_key
from mlxrun.engine import Engine, EngineConfig, Event, Request
from mlxrun.generate import generate_stream
from mlxrun.kv_files import read_header
from mlxrun.sampling import SamplingParams

LAYERS, HEADS, DIM, CHUNK = 3, 2, 8, 16
LAYOUT = [(HEADS, DIM, "F32")] * LAYERS
NS = ("model-a", None)


def _block(start: int, length: int) -> KVBlock:
    """Keys hold their position in the sequence (values its negative), so slices are checkable."""
    pos = mx.arange(start, start + length, dtype=mx.float32)[None, None, :, None]
    shape = (1, HEADS, length, DIM)
    layers = [
        (mx.broadcast_to(pos + 1000 * i, shape), mx.broadcast_to(-pos - 1000 * i, shape))
        for i in range(LAYERS)
    ]
    return KVBlock([(mx.array(k), mx.array(v)) for k, v in layers])


def _tier(root, fingerprint="fp-1", model_id="model-a", **kw) -> DiskTier:
    kw = {"budget_bytes": 1 << 30, "chunk_tokens": CHUNK, **kw}
    return DiskTier(root, model_id=model_id, fingerprint=fingerprint, layout=LAYOUT, **kw)


def _save(tier: DiskTier, tokens: list[int], pieces=(None,)) -> None:
    """Offer a path (as the radix cache evicts it: consecutive blocks), and wait for the writes."""
    cuts = [0, *[p for p in pieces if p is not None], len(tokens)]
    tier.offer(NS, tokens, [_block(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)])
    _drain(tier)


def _drain(tier: DiskTier, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while tier.stats()["queued_bytes"] and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.02)  # the budget and sibling pruning run right after the last write
    assert tier.stats()["queued_bytes"] == 0


def _read(tier: DiskTier, tokens: list[int], have: int = 0) -> tuple[list[float], int, int]:
    """(positions read, first token read, end) for the longest prefix of `tokens` on disk."""
    read = tier.fetch(NS, tokens, have)
    if read is None:
        return [], have, have
    block, end = read.block()
    assert block is not None
    return block.layers[1][0][0, 0, :, 0].tolist(), read.start, end


def _files(tier: DiskTier) -> list:
    return sorted(tier.dir.glob("*.safetensors"))


def _bytes(tier: DiskTier) -> int:
    return sum(p.stat().st_size for p in _files(tier))


A = list(range(100, 164))  # 64 tokens: 4 chunks
B = A[:48] + list(range(500, 516))  # shares 3 chunks with A


# ------------------------------------------------------------------------------ sharing, lookup


@pytest.mark.pure
def test_siblings_store_the_shared_prefix_once(tmp_path):
    tier = _tier(tmp_path)
    _save(tier, A, pieces=(40,))  # the radix path came as two blocks: cuts need not be aligned
    one = _bytes(tier)
    _save(tier, B)
    assert len(_files(tier)) == 5  # 4 of A + B's own last chunk
    assert _bytes(tier) <= 1.3 * one
    assert _read(tier, A) == ([1000 + i for i in range(64)], 0, 64)
    assert _read(tier, B)[2] == 64 and _read(tier, B)[0][48:] == [1000 + i for i in range(48, 64)]
    tier.close()


@pytest.mark.pure
def test_lookup_walks_chained_keys_and_ends_inside_a_chunk(tmp_path):
    tier = _tier(tmp_path)
    _save(tier, A[:40])  # two chunks and an 8-token tail
    chain = tier.lookup(NS, A[:37] + [1, 2, 3])
    k1 = chain_key(tier.root_key(NS), A[:16])
    k2 = chain_key(k1, A[16:32])
    assert chain == [(k1, 16), (k2, 16), (chain_key(k2, A[32:40]), 5)]
    assert _read(tier, A[:37] + [9])[2] == 37  # a prompt diverging inside the tail: 5 of its 8
    assert tier.lookup(("model-b", None), A) == []  # namespaces never mix
    # Part already in memory: only the segments past it are read.
    positions, start, end = _read(tier, A[:40], have=20)
    assert (start, end) == (16, 40) and positions == [1000 + i for i in range(16, 40)]
    tier.close()


@pytest.mark.pure
def test_a_longer_tail_replaces_the_shorter_one_it_covers(tmp_path):
    tier = _tier(tmp_path)
    _save(tier, A[:20])
    _save(tier, A[:28])
    _save(tier, A[:24])  # covered by the 12-token tail already there: nothing written
    assert len(_files(tier)) == 2 and tier.stats()["writes"] == 3
    assert _read(tier, A[:28])[2] == 28
    tier.close()


# ------------------------------------------------------------------------------ restarts, files


@pytest.mark.pure
def test_segments_survive_a_restart_with_safe_permissions(tmp_path):
    first = _tier(tmp_path)
    _save(first, A)
    _save(first, B)
    first.close()
    again = _tier(tmp_path)
    assert _read(again, A)[2] == 64 and _read(again, B)[2] == 64
    assert again.stats()["segments"] == 5 and again.stats()["bad_files"] == 0
    assert stat.S_IMODE(again.dir.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in _files(again)} == {0o600}
    again.close()


@pytest.mark.pure
def test_files_stay_private_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        tier = _tier(tmp_path)
        _save(tier, A)
        tier.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(tier.dir.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in _files(tier)} == {0o600}


def _chain_files(tier: DiskTier, tokens: list[int]) -> list:
    return [tier.dir / f"{k}.safetensors" for k, _ in tier.lookup(NS, tokens)]


@pytest.mark.pure
def test_torn_foreign_and_orphaned_files_are_deleted_never_loaded(tmp_path):
    first = _tier(tmp_path)
    _save(first, A)
    _save(first, B)
    a_files, b_files = _chain_files(first, A), _chain_files(first, B)
    first.close()
    torn = a_files[3]
    torn.write_bytes(torn.read_bytes()[:-10])  # a write cut short
    (first.dir / ".tmp-0123").write_bytes(b"half a file")
    (first.dir / "garbage.safetensors").write_bytes(b"\x00" * 3)
    header, _ = read_header(b_files[3])  # metadata names the segment's own tokens only
    assert json.loads(header["__metadata__"]["tokens"]) == B[48:]
    again = _tier(tmp_path)
    assert again.stats()["bad_files"] == 2  # the torn file and the garbage
    assert not torn.exists() and not (first.dir / ".tmp-0123").exists()
    assert _read(again, A)[2] == 48 and _read(again, B)[2] == 64
    again.close()
    # A parent gone: its children can never match, and go too.
    a_files[1].unlink()
    third = _tier(tmp_path)
    assert _read(third, B)[2] == 16 and len(_files(third)) == 1
    third.close()


@pytest.mark.pure
def test_wrong_shapes_or_a_bad_checksum_are_caught(tmp_path):
    first = _tier(tmp_path)
    _save(first, A[:32])
    first.close()
    # Another KV layout (e.g. another head dim): the header's shapes disagree -> deleted.
    other = DiskTier(tmp_path, model_id="model-a", fingerprint="fp-1", budget_bytes=1 << 30,
                     layout=[(HEADS, DIM // 2, "F32")] * LAYERS, chunk_tokens=CHUNK)  # fmt: skip
    assert other.stats()["bad_files"] == 2 and not _files(other)
    other.close()
    second = _tier(tmp_path)
    _save(second, A[:32])
    second.close()
    # Same size, flipped data (a torn page): found at read time, the chain stops before it.
    third = _tier(tmp_path)
    path = _chain_files(third, A)[1]
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(raw))
    assert _read(third, A[:32]) == ([1000 + i for i in range(16)], 0, 16)
    assert not path.exists() and third.stats()["bad_files"] == 1
    third.close()


@pytest.mark.pure
def test_other_weights_invalidate_and_other_models_keep_their_files(tmp_path):
    first = _tier(tmp_path)
    _save(first, A)
    first.close()
    other_model = _tier(tmp_path, model_id="model-b", fingerprint="fp-9")
    assert other_model.dir != first.dir and other_model.lookup(NS, A) == []
    other_model.close()
    assert len(_files(first)) == 4  # another model's directory is left alone
    reconverted = _tier(tmp_path, fingerprint="fp-2")  # same model id, other weights
    assert reconverted.lookup(NS, A) == [] and not _files(reconverted)
    assert reconverted.stats()["bad_files"] == 4
    reconverted.close()


# ------------------------------------------------------------------------------ budget, queue


def _consistent(tier: DiskTier) -> bool:
    """Every segment's parent is a root or is there: nothing unreachable is kept."""
    roots = {tier.root_key(NS)}
    return all(s.parent in roots or s.parent in tier._index for s in tier._index.values())


@pytest.mark.pure
def test_the_budget_drops_least_recently_used_leaves_never_a_parent_first(tmp_path):
    tier = _tier(tmp_path)
    _save(tier, A)  # 4 segments
    tier.budget_bytes = int(6.5 * _bytes(tier) / 4)
    _save(tier, B)  # + 1 (B's last chunk, a second child of A's third)
    time.sleep(0.01)
    _save(tier, list(range(900, 932)))  # + 2: 7 files, over budget by one
    # A's first three chunks are as old as its leaf, but have children: the leaf goes alone.
    assert tier.stats()["evicted"] == 1
    assert _read(tier, A)[2] == 48 and _read(tier, B)[2] == 64  # reads refresh their chains
    time.sleep(0.01)
    _save(tier, list(range(700, 732)))  # over by two: the oldest path, leaf then parent
    assert tier.stats()["evicted"] == 3
    assert _read(tier, list(range(900, 932)))[2] == 0
    assert _read(tier, B)[2] == 64 and _read(tier, list(range(700, 732)))[2] == 32
    assert _consistent(tier) and _bytes(tier) == tier.total_bytes <= tier.budget_bytes
    tier.close()


@pytest.mark.pure
def test_a_full_write_queue_drops_segments_instead_of_waiting(tmp_path, monkeypatch):
    def slow_write(self, path, arrays, meta):
        time.sleep(1.0)
        return type(self)._real_write(self, path, arrays, meta)

    monkeypatch.setattr(DiskTier, "_real_write", DiskTier._write_file, raising=False)
    monkeypatch.setattr(DiskTier, "_write_file", slow_write)
    seg = _block(0, CHUNK).nbytes
    tier = _tier(tmp_path, max_pending_bytes=2 * seg)
    start = time.perf_counter()
    for i in range(4):
        tier.offer(NS, [i] * 64, [_block(0, 64)])
    assert time.perf_counter() - start < 0.8  # never waited for a 1 s write
    assert tier.stats()["dropped"] >= 3
    # What was queued can be read before it is written; then it lands on disk.
    assert _read(tier, [0] * 64)[2] in (16, 32)
    tier.close()
    assert 1 <= len(_files(tier)) <= 3


# ------------------------------------------------------------------------------ with the engine


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama")))


def _engine(lm, tmp_path, **kw) -> Engine:
    kw = {"cache_dir": str(tmp_path), "namespace": "tiny-llama", "disk_chunk_tokens": CHUNK, **kw}
    return Engine(lm[0], EngineConfig(eos_token_ids=lm[2].eos_token_ids, **kw)).start()


def _tokens(events: list[Event]) -> list[int]:
    return [t for e in events for t in e.new_token_ids]


def _reference(lm, ids: list[int], params: SamplingParams = GREEDY) -> list[int]:
    chunks = generate_stream(lm[0], lm[1], ids, params)
    return [c.token_id for c in chunks if c.token_id is not None]


def _disk_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.glob("*/*.safetensors"))


SYSTEM = [(7 * i) % 390 + 10 for i in range(64)]  # a shared "system prompt" of 4 chunks


@pytest.mark.model
def test_sibling_conversations_share_the_disk_and_both_hit_after_a_restart(lm, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    conv = [SYSTEM + [11, 12, 13, 14, 15], SYSTEM + [21, 22, 23, 24, 25, 26]]
    with _engine(lm, one) as engine:
        engine.generate_sync(Request("a", conv[0], GREEDY))
    with _engine(lm, two) as engine:
        cold = [
            _tokens(engine.generate_sync(Request(f"c{i}", c, GREEDY))) for i, c in enumerate(conv)
        ]
    assert _disk_bytes(two) <= 1.3 * _disk_bytes(one)
    with _engine(lm, two, cache_memory_bytes=0) as engine:  # memory tier off: the disk serves
        follow = [c + cold[i][:3] + [30 + i] for i, c in enumerate(conv)]
        warm = [engine.generate_sync(Request(f"w{i}", f, GREEDY)) for i, f in enumerate(follow)]
        assert engine.stats()["disk_hits"] == 2
    for i, events in enumerate(warm):
        assert events[0].cached_tokens == len(conv[i]) + 3  # all but the new token
        assert _tokens(events) == _reference(lm, follow[i])


@pytest.mark.model
def test_other_weights_under_the_same_name_never_hit(lm, checkpoint_factory, tmp_path):
    from mlxrun.loader import load

    with _engine(lm, tmp_path) as engine:
        engine.generate_sync(Request("a", SYSTEM, GREEDY))
    stale = len(list(tmp_path.glob("*/*.safetensors")))
    assert stale == 5  # 64 prompt + 8 generated tokens: 4 chunks and an 8-token tail
    other = load(str(checkpoint_factory("llama", seed=1)))  # same shapes, other weights
    with _engine(other, tmp_path) as engine:
        events = engine.generate_sync(Request("a", SYSTEM, GREEDY))
        assert engine.stats()["cache_disk_bad_files"] == stale  # stale files are deleted
    assert events[0].cached_tokens == 0
    assert _tokens(events) == _reference(other, SYSTEM)


def _timed_stream(engine: Engine, request: Request) -> tuple[list[float], threading.Thread]:
    """Consume a stream on a thread, noting when each token arrives."""
    times: list[float] = []

    def consume() -> None:
        for event in engine.submit_sync(request):
            times.extend(time.perf_counter() for _ in event.new_token_ids)

    thread = threading.Thread(target=consume)
    thread.start()
    return times, thread


def _gaps(times: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in times if start <= t <= end]
    return [b - a for a, b in zip(inside, inside[1:], strict=False)]


def _decode_under_evictions(
    lm, tmp_path, slow: threading.Event | None = None, **kw
) -> tuple[list[float], dict, dict]:
    """A long stream decodes while short requests come and go; each leaving one evicts another's
    KV from a small memory tier (to the disk tier, when on). Returns the stream's token gaps
    while the short requests ran, and the engine's stats then and after shutdown."""
    long = Request(
        "long", [5, 6, 7], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    )
    with _engine(lm, tmp_path, cache_memory_bytes=60 * _kv_per_token(lm), **kw) as engine:
        times, thread = _timed_stream(engine, long)
        while len(times) < 5:
            time.sleep(0.005)
        start = time.perf_counter()
        for i in range(6):
            prompt = [(i * 37 + j) % 390 + 10 for j in range(40)]
            engine.generate_sync(Request(f"s{i}", prompt, SamplingParams(max_tokens=2)))
        end = time.perf_counter()
        assert len(times) < 400, "the long stream ended before the short requests did"
        stats = engine.stats()
        if slow is not None:
            slow.clear()  # the rest (the shutdown's writes) at full speed
        thread.join()
    return _gaps(times, start, end), stats, engine.stats()


def _kv_per_token(lm) -> int:
    from mlxrun import models
    from mlxrun.cache import kv_bytes_per_token

    cache = models.make_cache(lm[0])
    mx.eval(lm[0](mx.array([[1]]), cache=cache))
    return kv_bytes_per_token(cache)


@pytest.mark.model
def test_slow_disk_writes_never_stall_the_decode_step(lm, tmp_path, monkeypatch):
    write_s, slow = 0.4, threading.Event()

    def slow_write(self, path, arrays, meta):
        if slow.is_set():
            time.sleep(write_s)
        return kv_files.write_segment(path, arrays, meta)

    base, _, _ = _decode_under_evictions(lm, tmp_path / "off", cache_dir=None)
    monkeypatch.setattr(DiskTier, "_write_file", slow_write)
    slow.set()
    gaps, stats, after = _decode_under_evictions(lm, tmp_path / "on", slow)
    # Synchronous writes would stall a step for >= 2 files (0.8 s). Loose: a loaded 2-core box.
    assert max(gaps) < write_s
    assert sum(gaps) / len(gaps) < 3 * sum(base) / len(base) + 0.01
    assert stats["cache_memory_evictions"] >= 4 and stats["cache_disk_segments"] >= 8
    assert stats["cache_disk_writes"] < stats["cache_disk_segments"]  # still writing meanwhile
    # Shutdown waits for the queue: every segment is on disk, none was dropped.
    assert after["cache_disk_queued_bytes"] == 0 and after["cache_disk_dropped"] == 0
    assert len(list((tmp_path / "on").glob("*/*.safetensors"))) == after["cache_disk_segments"]


@pytest.mark.model
def test_a_slow_disk_read_never_stalls_running_streams(lm, tmp_path, monkeypatch):
    read_s = 0.5
    prompt = SYSTEM + [40, 41, 42]
    with _engine(lm, tmp_path) as engine:
        engine.generate_sync(Request("a", prompt, GREEDY))

    def slow_read(self, seg):
        time.sleep(read_s)
        return kv_files.read_segment(self.dir / f"{seg.key}.safetensors", *seg.header)

    monkeypatch.setattr(DiskTier, "_read_file", slow_read)
    long = Request(
        "long", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    )
    with _engine(lm, tmp_path) as engine:
        times, thread = _timed_stream(engine, long)
        while len(times) < 5:
            time.sleep(0.005)
        start = time.perf_counter()
        follow = prompt + [50, 51]
        events = engine.generate_sync(Request("b", follow, GREEDY))
        end = time.perf_counter()
        assert len(times) < 2000, "the long stream ended before the read did"
        thread.join()
    assert end - start >= read_s  # the read did take place while the stream ran
    assert events[0].cached_tokens == len(prompt)
    assert _tokens(events) == _reference(lm, follow)
    gaps = _gaps(times, start, end)
    assert len(gaps) > 10 and max(gaps) < read_s / 2


# ------------------------------------------------------------------------------ `mlxrun serve`


def _serve_once(model_dir, cache_dir, messages) -> int:
    """One chat completion on a fresh `mlxrun serve` with the disk tier; its cached tokens."""
    import openai

    from serverutil import start_cli

    proc, base = start_cli(model_dir, "--cache-dir", str(cache_dir), "--cache-disk-size", "1MB")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=5, temperature=0
        )
        details = reply.usage.prompt_tokens_details
        return details.cached_tokens if details else 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


@pytest.mark.server
def test_serve_keeps_the_disk_tier_under_its_size_across_restarts(tiny_llama, tmp_path):
    messages = [{"role": "system", "content": "You review Python code. " * 8},
                {"role": "user", "content": "hello"}]  # fmt: skip
    assert _serve_once(tiny_llama, tmp_path, messages) == 0
    files = list(tmp_path.glob("*/*.safetensors"))
    assert files and sum(p.stat().st_size for p in files) <= 10**6
    assert _serve_once(tiny_llama, tmp_path, messages) > 0  # a new process: hit from disk


@pytest.mark.server
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-dir", "D", "--cache-disk-size", "lots"], "--cache-disk-size: cannot read size"),
        (["--cache-disk-size", "2GB"], "--cache-disk-size needs --cache-dir"),
    ],
)
def test_bad_disk_size_flags_are_one_line(tmp_path, args, message):
    from serverutil import CLI

    args = [str(tmp_path / "d") if a == "D" else a for a in args]
    proc = subprocess.run([*CLI, str(tmp_path / "nomodel"), *args], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), proc.stderr


@pytest.mark.pure
def test_at_shutdown_a_full_queue_waits_instead_of_dropping(tmp_path, monkeypatch):
    def slow_write(self, path, arrays, meta):
        time.sleep(0.05)
        return kv_files.write_segment(path, arrays, meta)

    monkeypatch.setattr(DiskTier, "_write_file", slow_write)
    tier = _tier(tmp_path, max_pending_bytes=_block(0, CHUNK).nbytes)
    tier.wait_when_full = True  # what the engine sets before it evicts everything
    for i in range(3):
        tier.offer(NS, [i] * 32, [_block(0, 32)])
    tier.close()
    assert tier.stats()["dropped"] == 0 and len(_files(tier)) == 6


@pytest.mark.pure
def test_a_smaller_budget_applies_at_start(tmp_path):
    first = _tier(tmp_path)
    _save(first, A)
    _save(first, B)
    first.close()
    size = _bytes(first)
    again = _tier(tmp_path, budget_bytes=size // 2)
    assert _bytes(again) == again.total_bytes <= size // 2 and _consistent(again)
    assert _read(again, A)[2] >= 16 or _read(again, B)[2] >= 16  # the shared root stays longest
    again.close()
