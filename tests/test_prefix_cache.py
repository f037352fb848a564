"""Pure tier: the radix prefix index, driven with fake values (tuples of ints), no MLX."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxrun.prefix_cache import RadixCache

pytestmark = pytest.mark.pure

NS = ("model-a",)
BYTES_PER_TOKEN = 4


def val(tag: int, tokens) -> tuple[int, ...]:
    """A fake KV segment: one int per token, tagged so we can tell which insert it came from."""
    return tuple(tag * 1000 + i for i in range(len(tokens)))


def make(capacity: int = 10**9, evicted: list | None = None) -> RadixCache:
    def on_evict(ns, path, values):
        if evicted is not None:
            evicted.append((ns, path, values))

    return RadixCache(
        capacity,
        nbytes=lambda v: BYTES_PER_TOKEN * len(v),
        split=lambda v, k: (v[:k], v[k:]),
        on_evict=on_evict,
    )


def flat(values) -> tuple[int, ...]:
    return tuple(x for seg in values for x in seg)


def test_modules_do_not_import_mlx():
    code = "import sys, mlxrun.prefix_cache, mlxrun.scheduler; assert 'mlx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_insert_then_match_returns_the_value():
    c = make()
    v = val(1, [1, 2, 3, 4])
    assert c.insert(NS, [1, 2, 3, 4], v) == 4
    m = c.match_prefix(NS, [1, 2, 3, 4, 5, 6])
    assert m.length == 4 and flat(m.values) == v
    assert c.match_prefix(NS, [9, 1, 2]).length == 0
    assert c.num_tokens == 4 and c.total_bytes == 16


def test_insert_diverging_sequence_splits_edge_and_values():
    c = make()
    a, b = val(1, "abcd"), val(2, "abxy")
    c.insert(NS, [1, 2, 3, 4], a)
    assert c.insert(NS, [1, 2, 7, 8], b) == 2  # only "xy" is new
    m = c.match_prefix(NS, [1, 2, 7, 8])
    assert m.values == [a[:2], b[2:]]  # the shared part keeps the first insert's value
    m = c.match_prefix(NS, [1, 2, 3, 4])
    assert m.values == [a[:2], a[2:]]
    assert c.num_tokens == 6 and c.total_bytes == 6 * BYTES_PER_TOKEN
    assert c.stats()["nodes"] == 3


def test_match_stopping_inside_an_edge_splits_it():
    c = make()
    v = val(1, range(6))
    c.insert(NS, [1, 2, 3, 4, 5, 6], v)
    m = c.match_prefix(NS, [1, 2, 3, 9])
    assert m.length == 3 and m.values == [v[:3]]
    assert c.match_prefix(NS, [1, 2, 3]).values == [v[:3]]
    assert c.match_prefix(NS, [1, 2, 3, 4, 5, 6]).values == [v[:3], v[3:]]
    assert c.num_tokens == 6 and c.total_bytes == 24


def test_insert_of_present_sequence_stores_nothing():
    c = make()
    c.insert(NS, [1, 2, 3, 4], val(1, "abcd"))
    before = c.stats()
    assert c.insert(NS, [1, 2, 3, 4], val(2, "abcd")) == 0
    assert c.insert(NS, [1, 2], val(3, "ab")) == 0  # a prefix of a stored path
    assert c.insert(NS, [], ()) == 0
    assert c.total_bytes == before["bytes"] and c.num_tokens == before["tokens"]
    assert flat(c.match_prefix(NS, [1, 2, 3, 4]).values) == val(1, "abcd")


def test_namespaces_are_isolated():
    c = make()
    c.insert(("a",), [1, 2, 3], val(1, "abc"))
    m = c.match_prefix(("b",), [1, 2, 3])
    assert m.length == 0 and m.values == [] and m.node is None
    assert c.insert(("b",), [1, 2, 3], val(2, "abc")) == 3
    assert flat(c.match_prefix(("a",), [1, 2, 3]).values) == val(1, "abc")
    assert flat(c.match_prefix(("b",), [1, 2, 3]).values) == val(2, "abc")
    assert c.stats()["namespaces"] == 2


def test_lru_eviction_under_byte_budget():
    evicted: list = []
    c = make(capacity=8 * BYTES_PER_TOKEN, evicted=evicted)
    a, b = val(1, "abcd"), val(2, "efgh")
    c.insert(NS, [1, 2, 3, 4], a)
    c.insert(NS, [5, 6, 7, 8], b)
    assert evicted == [] and c.total_bytes == 32
    c.match_prefix(NS, [1, 2, 3, 4])  # a is now more recent than b
    c.insert(NS, [9, 10], val(3, "ij"))
    assert evicted == [(NS, (5, 6, 7, 8), [b])]
    assert c.match_prefix(NS, [5, 6, 7, 8]).length == 0
    assert c.match_prefix(NS, [1, 2, 3, 4]).length == 4
    assert c.total_bytes == 24 and c.stats()["evictions"] == 1


def test_eviction_takes_leaves_first_with_full_paths():
    evicted: list = []
    c = make(evicted=evicted)
    a, b = val(1, "abcd"), val(2, "abxy")
    c.insert(NS, [1, 2, 3, 4], a)
    c.insert(NS, [1, 2, 7, 8], b)
    c.match_prefix(NS, [1, 2, 3, 4])  # "cd" newer than "xy"
    c.match_prefix(NS, [1, 2])  # the shared parent is the newest of all, yet goes last
    assert c.evict(1) == 2 * BYTES_PER_TOKEN  # one whole leaf is enough
    assert evicted == [(NS, (1, 2, 7, 8), [a[:2], b[2:]])]
    assert c.evict(10**6) == 4 * BYTES_PER_TOKEN
    assert evicted[1:] == [(NS, (1, 2, 3, 4), [a[:2], a[2:]]), (NS, (1, 2), [a[:2]])]
    assert c.total_bytes == 0 and c.num_tokens == 0 and c.stats()["nodes"] == 0


def test_locked_nodes_are_never_evicted():
    evicted: list = []
    c = make(evicted=evicted)
    a = val(1, "abcd")
    c.insert(NS, [1, 2, 3, 4], a)
    c.insert(NS, [5, 6], val(2, "ef"))
    m = c.match_prefix(NS, [1, 2, 3, 4])
    c.lock(m.node)
    c.insert(NS, [1, 2, 9], val(3, "abz"))  # splits the locked edge: the lock must follow
    freed = c.evict(10**6)
    assert freed == 3 * BYTES_PER_TOKEN  # "ef" and "z" only
    assert {p for _, p, _ in evicted} == {(5, 6), (1, 2, 9)}
    assert flat(c.match_prefix(NS, [1, 2, 3, 4]).values) == a
    c.unlock(m.node)
    assert c.evict(10**6) == 4 * BYTES_PER_TOKEN
    assert c.total_bytes == 0
    with pytest.raises(ValueError):
        c.unlock(m.node)


def test_lock_of_a_child_protects_its_ancestors():
    c = make()
    c.insert(NS, [1, 2], val(1, "ab"))
    c.insert(NS, [1, 2, 3, 4], val(2, "abcd"))
    c.lock(c.match_prefix(NS, [1, 2, 3, 4]).node)
    assert c.evict(10**6) == 0
    assert c.match_prefix(NS, [1, 2, 3, 4]).length == 4


def test_insert_over_capacity_evicts_immediately():
    evicted: list = []
    c = make(capacity=0, evicted=evicted)
    assert c.insert(NS, [1, 2, 3], val(1, "abc")) == 3
    assert evicted == [(NS, (1, 2, 3), [val(1, "abc")])]
    assert c.total_bytes == 0 and c.match_prefix(NS, [1, 2, 3]).length == 0


def test_stats_count_hits_misses_and_evictions():
    c = make(capacity=4 * BYTES_PER_TOKEN)
    c.insert(NS, [1, 2, 3], val(1, "abc"))
    c.match_prefix(NS, [1, 2, 5])
    c.match_prefix(NS, [7])
    c.match_prefix(("other",), [1])
    c.insert(NS, [4, 5], val(2, "de"))  # 5 tokens > 4: evicts
    s = c.stats()
    assert (s["hits"], s["misses"], s["hit_tokens"]) == (1, 2, 2)
    assert s["evictions"] >= 1 and s["bytes"] == c.total_bytes <= 16
    assert s["capacity_bytes"] == 16 and s["tokens"] == c.num_tokens


def test_clear_drops_everything_without_on_evict():
    evicted: list = []
    c = make(evicted=evicted)
    c.insert(NS, [1, 2], val(1, "ab"))
    c.clear()
    assert evicted == [] and c.total_bytes == 0 and c.num_tokens == 0
    assert c.match_prefix(NS, [1, 2]).length == 0


class Oracle:
    """Per-prefix model: the value element stored for token position j of prefix P."""

    def __init__(self):
        self.elem: dict[tuple[int, ...], int] = {}

    def insert(self, tokens, value) -> int:
        new = 0
        for j in range(len(tokens)):
            key = tuple(tokens[: j + 1])
            if key not in self.elem:
                self.elem[key] = value[j]
                new += 1
        return new

    def match(self, tokens) -> tuple[int, ...]:
        out = []
        for j in range(len(tokens)):
            key = tuple(tokens[: j + 1])
            if key not in self.elem:
                break
            out.append(self.elem[key])
        return tuple(out)


seqs = st.lists(st.integers(0, 3), min_size=0, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), seqs), min_size=1, max_size=30),
    capacity=st.sampled_from([6, 12, 40, 10**6]),
)
def test_random_ops_match_a_per_prefix_oracle(ops, capacity):
    evicted: list = []
    c = make(capacity=capacity * BYTES_PER_TOKEN, evicted=evicted)
    oracle = Oracle()
    for tag, (is_insert, tokens) in enumerate(ops):
        if is_insert:
            v = val(tag + 1, tokens)
            expected_new = oracle.insert(tokens, v)
            assert c.insert(NS, tokens, v) == expected_new
            for _, path, values in evicted:
                # Evicted data is exactly what the oracle held; the leaf's own tokens leave it.
                assert flat(values) == oracle.match(path)
                assert sum(len(x) for x in values) == len(path)
                for j in range(len(path) - len(values[-1]), len(path)):
                    del oracle.elem[path[: j + 1]]
            evicted.clear()
            assert c.total_bytes <= capacity * BYTES_PER_TOKEN
        else:
            m = c.match_prefix(NS, tokens)
            assert flat(m.values) == oracle.match(tokens)
            assert m.length == len(flat(m.values))
        assert c.num_tokens == len(oracle.elem)
        assert c.total_bytes == BYTES_PER_TOKEN * len(oracle.elem)


def test_split_recounts_bytes_with_per_segment_overhead():
    c = RadixCache(
        10**9, nbytes=lambda v: 100 + len(v), split=lambda v, k: (v[:k], v[k:])
    )  # each segment carries a fixed header, so a split adds bytes
    c.insert(NS, [1, 2, 3, 4], val(1, "abcd"))
    assert c.total_bytes == 104
    c.match_prefix(NS, [1, 2, 9])  # splits into "ab" + "cd"
    assert c.total_bytes == 102 + 102
    c.insert(NS, [1, 2, 7], val(2, "abz"))
    assert c.total_bytes == 102 + 102 + 101
    assert c.evict(1) == 102 and c.total_bytes == 102 + 101  # "cd" is the LRU leaf
