"""Prefix cache: a radix index over token ids pointing at cached KV segments (after sglang's radix cache).

Design. The index is kept apart from the storage: a node holds a run of token ids (its edge label) and an
opaque `value` covering exactly those tokens (for the engine, the KV of those positions). Three callbacks
given to the constructor are all the index knows about values:

- `nbytes(value)` — bytes the value holds, for the byte budget;
- `split(value, k)` — `(first k tokens, rest)`, used when an edge is cut in two;
- `on_evict(namespace, token_path, values)` — called before a node is dropped, with the full token path
  from the root and the values along it (the disk tier persists the prefix there).

No MLX is needed, so tests drive it with fake values (tuples of ints).

Each namespace (e.g. `(model_id, adapter)`) has its own tree: nothing matches across namespaces.

- `match_prefix` walks the tree as far as the tokens agree. If they stop inside an edge, the edge is split
  so the returned node covers exactly the matched tokens; `values` are the segments along the path, in
  order, covering `length` tokens. Every node on the path gets a fresh LRU time.
- `insert` walks the same way and stores only what is missing: the tail of `value` past the matched part
  (cut with `split`) becomes one new leaf. Then, while over the byte budget, it evicts.
- Eviction drops unlocked leaves, least recently used first; a parent whose last child went becomes a
  leaf and a candidate in turn. `lock(node)` counts on the node and every ancestor, so a locked path (a
  request using that KV) is never evicted. Node handles stay valid across splits: a split keeps the
  existing node object as the lower part and puts a new node above it that inherits its lock count.

LRU time is a counter bumped per operation, not the wall clock, so the order is exact and testable.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# (model, adapter, ...): the cache never looks inside it.
Namespace = tuple[Hashable, ...]
OnEvict = Callable[[Namespace, tuple[int, ...], list[Any]], object]  # the result is unused


class _Node:
    __slots__ = (
        "key", "value", "nbytes", "children", "parent", "namespace", "last_access", "lock_ref", "uid",
    )  # fmt: skip

    def __init__(
        self,
        key: tuple[int, ...],
        value: Any,
        nbytes: int,
        parent: _Node | None,
        namespace: Namespace,
        uid: int,
    ):
        self.key = key
        self.value = value
        self.nbytes = nbytes
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.namespace = namespace
        self.last_access = 0
        self.lock_ref = 0
        self.uid = uid  # tie-break for equal LRU times (older node first)

    def __repr__(self) -> str:
        return f"_Node(key={self.key!r}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    length: int  # tokens matched
    values: list[Any]  # segments along the matched path, in order, covering `length` tokens
    node: Any  # handle for lock/unlock (the deepest matched node); None if the namespace is empty


def _common_len(key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    n = min(len(key), len(tokens) - start)
    if key[:n] == tokens[start : start + n]:
        return n
    for j in range(n):
        if key[j] != tokens[start + j]:
            return j
    return n


class RadixCache:
    def __init__(
        self,
        capacity_bytes: int,
        *,
        nbytes: Callable[[Any], int],
        split: Callable[[Any, int], tuple[Any, Any]],
        on_evict: OnEvict | None = None,
    ):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._nbytes = nbytes
        self._split_value = split
        self._on_evict = on_evict
        self._roots: dict[Namespace, _Node] = {}
        self._uids = itertools.count()
        self._clock = 0
        self._bytes = 0
        self._tokens = 0
        self._nodes = 0
        self._counts = dict.fromkeys(
            ("hits", "misses", "hit_tokens", "query_tokens", "inserted_tokens", "evictions",
             "evicted_bytes"), 0)  # fmt: skip

    # -- queries ---------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return self._bytes

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def stats(self) -> dict[str, int]:
        return {
            **self._counts,
            "bytes": self._bytes,
            "capacity_bytes": self.capacity_bytes,
            "tokens": self._tokens,
            "nodes": self._nodes,
            "namespaces": sum(1 for r in self._roots.values() if r.children),
        }

    # -- match and insert ------------------------------------------------------------------------

    def match_prefix(self, namespace: Namespace, token_ids: Sequence[int]) -> MatchResult:
        """Longest stored prefix of `token_ids` in `namespace`; refreshes its LRU time."""
        tokens = tuple(token_ids)
        self._counts["query_tokens"] += len(tokens)
        root = self._roots.get(namespace)
        if root is None:
            self._counts["misses"] += 1
            return MatchResult(0, [], None)
        node, length, values = self._walk(root, tokens)
        if length:
            self._counts["hits"] += 1
            self._counts["hit_tokens"] += length
        else:
            self._counts["misses"] += 1
        return MatchResult(length, values, node)

    def insert(self, namespace: Namespace, token_ids: Sequence[int], value: Any) -> int:
        """Store `value` (covering all of `token_ids`); keep only the part not already stored.

        Returns how many new tokens were stored, then evicts LRU leaves while over the budget.
        """
        tokens = tuple(token_ids)
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = _Node((), None, 0, None, namespace, next(self._uids))
        node, matched, _ = self._walk(root, tokens)
        new = len(tokens) - matched
        if new:
            rest = self._split_value(value, matched)[1] if matched else value
            leaf = _Node(
                tokens[matched:], rest, self._nbytes(rest), node, namespace, next(self._uids)
            )
            leaf.last_access = self._clock
            node.children[tokens[matched]] = leaf
            self._account(leaf, +1)
            self._counts["inserted_tokens"] += new
        if self._bytes > self.capacity_bytes:
            self.evict(self._bytes - self.capacity_bytes)
        return new

    def _walk(self, root: _Node, tokens: tuple[int, ...]) -> tuple[_Node, int, list[Any]]:
        """Follow `tokens` down from `root`, splitting an edge they stop inside; touch the path."""
        self._clock += 1
        node, i, values = root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_len(child.key, tokens, i)
            if k < len(child.key):
                child = self._split(child, k)  # the loop then stops: the tokens diverge here
            child.last_access = self._clock
            values.append(child.value)
            node, i = child, i + k
        return node, i, values

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node`'s edge after k tokens. The new upper node is returned; `node` keeps the rest."""
        parent = node.parent
        assert parent is not None and 0 < k < len(node.key)
        first, rest = self._split_value(node.value, k)
        upper = _Node(
            node.key[:k], first, self._nbytes(first), parent, node.namespace, next(self._uids)
        )
        upper.last_access = node.last_access
        upper.lock_ref = node.lock_ref  # every lock on `node` also passes through `upper`
        upper.children[node.key[k]] = node
        parent.children[node.key[0]] = upper
        old_bytes = node.nbytes
        node.key, node.value, node.nbytes, node.parent = (
            node.key[k:],
            rest,
            self._nbytes(rest),
            upper,
        )
        self._bytes += upper.nbytes + node.nbytes - old_bytes
        self._nodes += 1
        return upper

    def _account(self, node: _Node, sign: int) -> None:
        self._bytes += sign * node.nbytes
        self._tokens += sign * len(node.key)
        self._nodes += sign

    # -- locks -----------------------------------------------------------------------------------

    def lock(self, node: Any) -> None:
        """Protect `node` and its ancestors from eviction (counted; pair with `unlock`)."""
        while node is not None and node.parent is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Any) -> None:
        while node is not None and node.parent is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock() without a matching lock()")
            node.lock_ref -= 1
            node = node.parent

    # -- eviction --------------------------------------------------------------------------------

    def _iter_nodes(self) -> Iterator[_Node]:
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def evict(self, nbytes: int) -> int:
        """Free at least `nbytes` if unlocked leaves allow (LRU first). Returns the bytes freed."""
        heap = [(n.last_access, n.uid, n) for n in self._iter_nodes() if self._evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < nbytes and heap:
            _, _, node = heapq.heappop(heap)
            freed += self._drop_leaf(node)
            parent = node.parent
            if parent is not None and self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        return freed

    @staticmethod
    def _evictable(node: _Node) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _drop_leaf(self, node: _Node) -> int:
        if self._on_evict is not None:
            path: list[_Node] = []
            cur: _Node | None = node
            while cur is not None and cur.parent is not None:
                path.append(cur)
                cur = cur.parent
            path.reverse()
            tokens = tuple(t for n in path for t in n.key)
            self._on_evict(node.namespace, tokens, [n.value for n in path])
        assert node.parent is not None
        del node.parent.children[node.key[0]]
        self._account(node, -1)
        self._counts["evictions"] += 1
        self._counts["evicted_bytes"] += node.nbytes
        return node.nbytes

    def clear(self) -> None:
        """Drop everything without calling on_evict (a reset, not memory pressure)."""
        self._roots.clear()
        self._bytes = self._tokens = self._nodes = 0

    # -- beyond the prefix (chunk reuse) -----------------------------------------------------------

    def continuations(
        self, namespace: Namespace, token_ids: Sequence[int], limit: int = 4
    ) -> tuple[int, list[tuple[tuple[int, ...], list[Any]]]]:
        """The cached paths that go on past the longest stored prefix of `token_ids`, for reusing
        chunks after the point where the tokens diverge (mlxrun.kv_reuse).

        Returns (prefix length, [(tokens, values) of each path below it]): at most `limit` paths,
        leaf to leaf, most recently used first; the values cover the tokens, which start at
        position `prefix length`. Refreshes the prefix's LRU time, not the paths'.
        """
        root = self._roots.get(namespace)
        if root is None:
            return 0, []
        node, length, _ = self._walk(root, tuple(token_ids))
        paths: list[tuple[tuple[int, ...], list[Any]]] = []
        stack: list[tuple[_Node, tuple[int, ...], list[Any]]] = [(node, (), [])]
        while stack and len(paths) < limit:
            cur, tokens, values = stack.pop()
            if not cur.children:
                if tokens:
                    paths.append((tokens, values))
                continue
            # Pushed oldest first, so the most recently used child is walked first.
            for child in sorted(cur.children.values(), key=lambda n: (n.last_access, n.uid)):
                stack.append((child, tokens + child.key, [*values, child.value]))
        return length, paths
