"""Quantized KV inside the running batch (--kv-bits): quality against full precision, batched
vs one at a time, prefix-cache hits with quantized blocks, memory per token, the disk tier's
refusal of quantized blocks, and the adaptive mode ("auto")."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

from mlxrun.cache import KVBlock, concat_blocks, split_block
from mlxrun.engine import Engine, EngineConfig, Event, Request
from mlxrun.errors import InvalidRequestError
from mlxrun.kv_files import read_header
from mlxrun.kv_quant import KVQuant, compare_to_full
from mlxrun.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    """hidden 256 / 4 heads: head_dim 64, one quantization group per head; float16 like the
    checkpoints users download (bf16/fp16), so the byte ratios are the real ones."""
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama", hidden_size=256, dtype="float16")))


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 400) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _engine(lm, **kw) -> Engine:
    return Engine(lm[0], EngineConfig(eos_token_ids=lm[2].eos_token_ids, **kw)).start()


def _tokens(events: list[Event]) -> list[int]:
    return [t for e in events for t in e.new_token_ids]


def _run_all(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    streams = [engine.submit_sync(r) for r in requests]
    return {s.id: _tokens(list(s)) for s in streams}


# ------------------------------------------------------------------ quality


@pytest.mark.model
def test_quality_gate_top1_agreement_and_kl(lm):
    prompt = _prompts(1, seed=3, lo=20, hi=21)[0]
    top1_8, kl_8 = compare_to_full(lm[0], prompt, 96, KVQuant(8))
    top1_4, kl_4 = compare_to_full(lm[0], prompt, 96, KVQuant(4))
    print(f"8-bit: top-1 {top1_8:.3f} KL {kl_8:.2e}; 4-bit: top-1 {top1_4:.3f} KL {kl_4:.2e}")
    assert top1_8 >= 0.97
    assert 0 < kl_8 < kl_4  # quantization happened, and 4 bits lose more than 8
    assert top1_4 >= 0.5  # reported, not gated; a broken 4-bit path would be near chance


# ------------------------------------------------------------------ batching


@pytest.mark.model
def test_batched_equals_one_at_a_time_at_8_bits(lm):
    # One prompt spans several 64-token chunks: prefill runs into its own quantized cache.
    prompts = _prompts(5) + _prompts(1, seed=2, lo=150, hi=151)
    requests = [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    with _engine(lm, kv_bits=8, cache_memory_bytes=0, max_tokens_per_step=64) as engine:
        alone = {r.id: _tokens(engine.generate_sync(r)) for r in requests}
        together = _run_all(
            engine, [Request(r.id + "b", r.prompt_token_ids, GREEDY) for r in requests]
        )
        stats = engine.stats()
    assert [together[r.id + "b"] for r in requests] == [alone[r.id] for r in requests]
    assert all(len(t) == 12 for t in alone.values())
    assert stats["kv_bits"] == 8 and stats["kv_bits_now"] == 8


@pytest.mark.model
def test_8_bit_engine_tokens_differ_little_from_full(lm):
    """The engine really runs quantized (its tokens are not the full-precision ones by
    accident of an unused flag) yet stays close: compared over 6 prompts x 12 tokens."""
    prompts = _prompts(6, seed=1)
    requests = [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    outs = {}
    for bits in (None, 8, 4):
        with _engine(lm, kv_bits=bits, cache_memory_bytes=0) as engine:
            outs[bits] = _run_all(engine, requests)
    same = {b: sum(x == y for r in requests for x, y in zip(outs[None][r.id], outs[b][r.id], strict=True))
            for b in (8, 4)}  # fmt: skip
    assert same[8] >= 0.8 * 72 and same[8] >= same[4]


# ------------------------------------------------------------------ prefix cache


@pytest.mark.model
def test_prefix_hit_with_quantized_blocks_gives_the_same_tokens(lm):
    base = _prompts(1, seed=5, lo=40, hi=41)[0]
    follow = base + [77, 78, 79]
    with _engine(lm, kv_bits=8, cache_memory_bytes=0) as engine:
        cold = _tokens(engine.generate_sync(Request("cold", follow, GREEDY)))
    with _engine(lm, kv_bits=8) as engine:
        engine.generate_sync(Request("warm", base, GREEDY))
        events = engine.generate_sync(Request("hit", follow, GREEDY))
        stats = engine.stats()
    assert events[-1].cached_tokens >= len(base)
    assert _tokens(events) == cold
    assert stats["cache_memory_bytes"] > 0


@pytest.mark.model
def test_quantized_blocks_are_smaller_per_token(lm):
    """bytes/token of the engine and of the prefix cache shrink ~1.9x at 8 bits, ~3.6x at 4
    (fp16 KV: 2 bytes per channel vs 1 or 0.5 plus a scale and bias per 64 channels)."""
    prompt = _prompts(1, seed=7, lo=50, hi=51)[0]
    per_token, cached = {}, {}
    for bits in (None, 8, 4):
        with _engine(lm, kv_bits=bits) as engine:
            engine.generate_sync(Request("a", prompt, GREEDY))
            stats = engine.stats()
        per_token[bits] = stats["kv_bytes_per_token"]
        cached[bits] = stats["cache_memory_bytes"] / stats["cache_memory_tokens"]
    for table in (per_token, cached):
        assert 1.8 < table[None] / table[8] < 2.0
        assert 3.3 < table[None] / table[4] < 3.7


def _block(quant: KVQuant | None, length: int = 10) -> KVBlock:
    layers = []
    for seed in range(2):
        k, v = (mx.random.normal((1, 2, length, 64), key=mx.random.key(seed + i)) for i in (0, 9))
        layers.append((k, v))
    return KVBlock(layers).to_precision(quant)


@pytest.mark.pure
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_block_split_concat_slice(bits):
    block = _block(KVQuant(bits)).materialize()
    first, rest = split_block(block, 4)
    assert (first.length, rest.length) == (4, 6)
    assert first.quant == rest.quant == KVQuant(bits)
    whole = concat_blocks([first, rest])
    for (k0, v0), (k1, v1) in zip(block.layers, whole.layers, strict=True):
        for a, b in zip(k0 + v0, k1 + v1, strict=True):
            assert mx.array_equal(a, b)
    middle = block.slice(2, 7)
    assert middle.length == 5 and middle.nbytes == block.nbytes * 5 // 10
    full = _block(None)
    assert block.nbytes < full.nbytes / 1.8
    # A path mixing precisions concatenates at the first block's precision.
    mixed = concat_blocks([full.slice(0, 3), block.slice(3)])
    assert mixed.quant is None and mixed.length == 10


# ------------------------------------------------------------------ disk tier


def _disk_files(root) -> list:
    return sorted(root.glob("*/*.safetensors"))


@pytest.mark.model
def test_disk_tier_stores_quantized_segments_and_reads_what_is_exact(lm, tmp_path):
    """An 8-bit engine writes its KV to disk at 8 bits (smaller files, the precision named in
    each file) and hits it after a restart with the tokens of a cold run; a full-precision engine
    never reads 8-bit files (that would lose precision it has), while an 8-bit engine reads
    full-precision ones, quantized on load (within 8-bit's own error of what it would compute)."""
    prompt = _prompts(1, seed=9, lo=30, hi=31)[0]
    follow = prompt + [5, 6]
    small = {"cache_dir": None, "disk_chunk_tokens": 8}
    q8, full = tmp_path / "q8", tmp_path / "full"
    with _engine(lm, kv_bits=8, **{**small, "cache_dir": str(q8)}) as engine:
        engine.generate_sync(Request("a", prompt, GREEDY))
    with _engine(lm, **{**small, "cache_dir": str(full)}) as engine:
        engine.generate_sync(Request("a", prompt, GREEDY))
    q8_files, full_files = _disk_files(q8), _disk_files(full)
    assert q8_files and len(q8_files) == len(full_files)
    q8_bytes = sum(f.stat().st_size for f in q8_files)
    full_bytes = sum(f.stat().st_size for f in full_files)
    assert q8_bytes < 0.7 * full_bytes, (q8_bytes, full_bytes)
    header, _ = read_header(q8_files[0])
    assert header["__metadata__"]["kv_quant"] == "8:64"

    with _engine(lm, kv_bits=8, cache_memory_bytes=0) as engine:
        cold8 = _tokens(engine.generate_sync(Request("cold", follow, GREEDY)))
    for root in (q8, full):  # 8-bit files, and full ones quantized on load
        with _engine(lm, kv_bits=8, **{**small, "cache_dir": str(root)}) as engine:
            events = engine.generate_sync(Request("hit", follow, GREEDY))
            assert engine.stats()["disk_hits"] == 1, root
        assert events[-1].cached_tokens >= len(prompt) - 8 and _tokens(events) == cold8
    with _engine(lm, **{**small, "cache_dir": str(q8)}) as engine:
        engine.generate_sync(Request("full", follow, GREEDY))
        assert engine.stats()["disk_hits"] == 0  # a full engine ignores the 8-bit files


# ------------------------------------------------------------------ adaptive


@pytest.mark.model
def test_auto_keeps_full_precision_while_memory_is_plentiful(lm):
    prompts = _prompts(3, seed=11)
    requests = [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    with _engine(lm, cache_memory_bytes=0) as engine:
        full = _run_all(engine, requests)
    with _engine(lm, kv_bits="auto", cache_memory_bytes=0) as engine:
        auto = _run_all(engine, requests)
        stats = engine.stats()
    assert auto == full
    assert stats["kv_precision_switches"] == 0 and stats["kv_bits_now"] == 16


@pytest.mark.model
def test_auto_moves_the_batch_to_8_bit_as_the_budget_fills(lm):
    """A KV budget of 110 full-precision tokens (~207 at 8 bits): one 70-token request runs at
    full precision; a second one joining converts the batch to 8 bits instead of waiting; a
    150-token request, refused at full precision, is accepted."""
    per_token = 2 * 2 * 2 * 64 * 2  # layers x (k, v) x kv heads x head_dim x fp16
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    budget = {"kv_memory_bytes": 110 * per_token, "cache_memory_bytes": 0}
    with pytest.raises(InvalidRequestError):
        with _engine(lm, **budget) as engine:
            engine.generate_sync(Request("big", list(range(10, 120)), params))
    with _engine(lm, kv_bits="auto", **budget) as engine:
        first = engine.submit_sync(Request("a", list(range(10, 40)), params))
        head = [next(first)]
        alone = engine.stats()
        second = engine.submit_sync(Request("b", list(range(50, 80)), params))
        head_b = [next(second)]
        both = engine.stats()
        rest_a, rest_b = _tokens(head + list(first)), _tokens(head_b + list(second))
        big = _tokens(engine.generate_sync(Request("big", list(range(10, 120)), params)))
        after = _tokens(engine.generate_sync(Request("small", list(range(10, 40)), params)))
        final = engine.stats()
    assert (alone["kv_bits_now"], alone["kv_sequences_full"], alone["kv_sequences_8bit"]) == (
        16,
        1,
        0,
    )
    assert (both["kv_bits_now"], both["kv_sequences_full"], both["kv_sequences_8bit"]) == (8, 0, 2)
    assert len(rest_a) == len(rest_b) == len(big) == 40
    # Load gone: back to full precision, and a request alone gets full-precision tokens again.
    assert final["kv_precision_switches"] >= 2 and final["kv_bits_now"] == 16
    with _engine(lm, cache_memory_bytes=0) as engine:
        assert after == _tokens(engine.generate_sync(Request("ref", list(range(10, 40)), params)))


@pytest.mark.model
def test_bad_kv_settings_are_typed_errors(lm):
    with pytest.raises(InvalidRequestError, match="kv_bits"):
        Engine(lm[0], EngineConfig(kv_bits=3))
    with pytest.raises(InvalidRequestError, match="kv_group_size"):
        Engine(lm[0], EngineConfig(kv_bits=8, kv_group_size=48))


@pytest.mark.model
def test_models_that_cannot_quantize_fall_back_to_full_precision(checkpoint_factory):
    """head_dim 32 does not divide into groups of 64: the engine warns and runs full precision
    rather than failing every request."""
    from mlxrun.loader import load

    lm = load(str(checkpoint_factory("llama")))  # hidden 128, 4 heads: head_dim 32
    with _engine(lm, kv_bits=8, cache_memory_bytes=0) as engine:
        tokens = _tokens(engine.generate_sync(Request("a", [5, 6, 7], GREEDY)))
        stats = engine.stats()
    assert len(tokens) == 12 and stats["kv_bits_now"] == 32 and stats["kv_bits"] == 32


# ------------------------------------------------------------------ the server flag


def _gauge(base_url: str, name: str) -> float:
    import httpx

    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.server
def test_serve_kv_bits_flag_reaches_the_engine(checkpoint_factory):
    """`mlxrun serve --kv-bits 4` as users run it: the openai client gets its completion and
    /metrics reports the KV precision; a bad value is a one-line usage error."""
    import subprocess

    import openai

    from serverutil import CLI, start_cli

    model = checkpoint_factory("llama", hidden_size=256, dtype="float16")
    proc, base_url = start_cli(model, "--kv-bits", "4", "--kv-group-size", "32")
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        name = client.models.list().data[0].id
        r = client.completions.create(model=name, prompt="def f(", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert _gauge(base_url, "mlxrun_kv_cache_bits") == 4
        assert _gauge(base_url, "mlxrun_kv_sequences_full") == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([*CLI, str(model), "--kv-bits", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--kv-bits" in bad.stderr


# ------------------------------------------------------------------ the batch cache itself


@pytest.mark.pure
def test_quantized_batch_cache_tracks_the_full_batch_cache():
    """merge, extend, filter, right-padded prepare/finalize: the quantized batch holds exactly
    the quantized form of what BatchKVCache holds (quantization is per token, so a row's
    padding and neighbours do not change its bytes), with the same positions and mask."""
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from mlxrun.kv_quant import BatchQuantizedKVCache, make_quantized_cache

    q = KVQuant(8)
    kv = [mx.random.normal((2, 1, 2, n, 64), key=mx.random.key(n)) for n in (5, 9, 3)]
    kv = [q.dequantize(q.quantize(x)) for x in kv]  # values that 8 bits hold exactly

    def caches(quantized: bool) -> list:
        out = []
        for x in kv:
            c = make_quantized_cache(1, q)[0] if quantized else KVCache()
            c.update_and_fetch(x[0], x[1])
            out.append(c)
        return out

    full, quant = caches(False), caches(True)
    fb, qb = BatchKVCache.merge(full[:2]), BatchQuantizedKVCache.merge(quant[:2])
    fb.extend(BatchKVCache.merge(full[2:]))
    qb.extend(BatchQuantizedKVCache.merge(quant[2:]))
    new = mx.random.normal((3, 2, 4, 64), key=mx.random.key(99))
    new = q.dequantize(q.quantize(new))
    for c in (fb, qb):  # a right-padded prompt batch of lengths 4, 2, 3
        c.prepare(lengths=[4, 2, 3], right_padding=[0, 2, 1])
        c.update_and_fetch(new, new)
        c.finalize()
        c.filter([2, 0])
    fk, fv = fb.keys_and_values()
    qk, qv = qb.keys_and_values()
    assert fk.shape == q.dequantize(qk).shape
    assert mx.allclose(fk, q.dequantize(qk), atol=0.05) and mx.allclose(
        fv, q.dequantize(qv), atol=0.05
    )
    assert mx.array_equal(fb.left_padding, qb.left_padding) and fb._idx == qb._idx
    assert mx.array_equal(fb.make_mask(1), qb.make_mask(1))
    assert qb.nbytes < fb.nbytes / 1.8  # float32 keys: 4 bytes vs ~1.1


@pytest.mark.pure
def test_a_quantized_segment_file_round_trips_and_its_shapes_are_checked(tmp_path):
    from mlxrun import kv_files

    quant = KVQuant(4, 64)
    layers = [(mx.random.normal((1, 2, 5, 64)), mx.random.normal((1, 2, 5, 64))) for _ in range(2)]
    block = KVBlock(layers).to_precision(quant)
    arrays = kv_files.block_arrays(block)
    path = tmp_path / "seg.safetensors"
    kv_files.write_segment(path, arrays, {"kv_quant": kv_files.quant_text(quant)})
    header, start = kv_files.read_header(path)
    layout = [(2, 64, "F32")] * 2
    kv_files.check_layout(header, layout, 5)
    back = kv_files.arrays_block(kv_files.read_segment(path, header, start), quant)
    assert back.quant == quant and back.length == 5
    for (k, v), (k2, v2) in zip(block.layers, back.layers, strict=True):
        for a, b in zip((*k, *v), (*k2, *v2), strict=True):
            assert mx.array_equal(a, b)
    with pytest.raises(kv_files.BadSegment):
        kv_files.check_layout(header, [(2, 128, "F32")] * 2, 5)  # another head dim
    header["__metadata__"]["kv_quant"] = "8:64"  # claims another precision than its arrays
    with pytest.raises(kv_files.BadSegment):
        kv_files.check_layout(header, layout, 5)
