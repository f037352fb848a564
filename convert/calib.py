"""Built-in calibration text for the quality report: English prose and Python code, interleaved.

Prose and code alternate in short blocks so that even the first couple of hundred tokens (the
default evaluation window) exercise both kinds of text a local model is asked for.
"""

from __future__ import annotations

SAMPLE_TEXT = '''\
The river town woke slowly. Before the shops opened, a delivery van stopped outside the bakery,
and the driver carried in flour, butter and a crate of apples while the owner swept the steps.

def mean(values: list[float]) -> float:
    """Arithmetic mean; raises on an empty list instead of dividing by zero."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)

By nine o'clock the square was busy. Students hurried to the station, an old man fed pigeons
from a paper bag, and two neighbours argued cheerfully about whether it would rain before noon.

class LRUCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        value = self.data.pop(key, None)
        if value is not None:
            self.data[key] = value  # re-insert: most recently used goes last
        return value

    def put(self, key: str, value: bytes) -> None:
        self.data.pop(key, None)
        self.data[key] = value
        while len(self.data) > self.capacity:
            del self.data[next(iter(self.data))]

A good explanation starts from what the reader already knows. It names the problem, shows one
small example, and only then introduces the general rule, so that the rule feels earned.

import re
from pathlib import Path

WORD = re.compile(r"[A-Za-z']+")


def word_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        for word in WORD.findall(line.lower()):
            counts[word] = counts.get(word, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

In the afternoon the weather turned. Clouds gathered over the hills to the west, the wind picked
up, and the market traders began tying down their awnings and packing the fragile goods first.

def binary_search(items: list[int], target: int) -> int:
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1

The library stayed open late on Wednesdays. A librarian with silver glasses helped a boy find a
book about volcanoes, then showed a retired engineer how to search the newspaper archive.

async def fetch_all(client, urls: list[str], limit: int = 8) -> list[str]:
    import asyncio

    semaphore = asyncio.Semaphore(limit)

    async def one(url: str) -> str:
        async with semaphore:
            response = await client.get(url, timeout=10.0)
            response.raise_for_status()
            return response.text

    return await asyncio.gather(*(one(u) for u in urls))

Measurements matter more than opinions. When two designs seem equally good, build the smaller
one, time it on real inputs, and let the numbers decide; write down what you learned either way.

@dataclass(frozen=True)
class Interval:
    start: float
    end: float

    def overlaps(self, other: "Interval") -> bool:
        return self.start < other.end and other.start < self.end

    def merge(self, other: "Interval") -> "Interval":
        return Interval(min(self.start, other.start), max(self.end, other.end))

By evening the rain had passed. The streets shone under the lamps, a cat watched the puddles from
a windowsill, and somewhere a radio played an old song about a ship that never came home.

def tokenize(text: str) -> list[str]:
    tokens, current = [], []
    for ch in text:
        if ch.isalnum() or ch == "_":
            current.append(ch)
            continue
        if current:
            tokens.append("".join(current))
            current = []
        if not ch.isspace():
            tokens.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens

Numbers appear everywhere in ordinary writing: 3 apples, 12 eggs, 1.5 litres of milk, 2024 pages,
a speed of 88 km/h, and a temperature that fell from 21 to 14 degrees in a single hour.
'''
