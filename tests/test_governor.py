"""The memory governor's rules (mlxrun/governor.py), keep-alive durations and models.toml, with no
model at all."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from mlxrun.errors import InsufficientMemoryError, InvalidRequestError
from mlxrun.governor import Governor, parse_keep_alive
from mlxrun.model_settings import load_settings

MB = 10**6

pytestmark = pytest.mark.pure


def test_governor_does_not_import_mlx():
    code = "import sys, mlxrun.governor; assert 'mlx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("2.5s", 2.5), ("500ms", 0.5), ("0", 0), (0, 0), (30, 30),
     ("45", 45), (-1, math.inf), ("-1", math.inf), ("-5m", math.inf), (2.0, 2.0)],
)  # fmt: skip
def test_keep_alive_reads_as_ollama(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "5x", "", True, None, "m", float("nan")])
def test_keep_alive_rejects_what_is_not_a_duration(value):
    with pytest.raises(InvalidRequestError) as e:
        parse_keep_alive(value)
    assert e.value.param == "keep_alive"


def _loaded(gov: Governor, name: str, nbytes: int, at: float, active: int = 0) -> None:
    gov.reserve(name, nbytes, at, 300)
    gov.loaded(name, at)
    for _ in range(active):
        gov.lease(name, at)


def test_fits_without_evicting():
    gov = Governor(100 * MB)
    _loaded(gov, "a", 40 * MB, 1)
    assert gov.plan_load("b", 60 * MB) == []


def test_evicts_least_recently_used_idle_models_until_it_fits():
    gov = Governor(100 * MB)
    _loaded(gov, "a", 30 * MB, at=3)
    _loaded(gov, "b", 30 * MB, at=1)  # oldest
    _loaded(gov, "c", 30 * MB, at=2)
    assert gov.plan_load("d", 45 * MB) == ["b", "c"]  # 10 free + 30 is short of 45
    assert gov.plan_load("d", 40 * MB) == ["b"]


def test_never_evicts_a_model_with_running_requests():
    gov = Governor(100 * MB)
    _loaded(gov, "busy", 50 * MB, at=1, active=1)  # the oldest, but running
    _loaded(gov, "idle", 40 * MB, at=5)
    assert gov.plan_load("new", 45 * MB) == ["idle"]
    gov.lease("idle", 6)
    with pytest.raises(InsufficientMemoryError) as e:
        gov.plan_load("new", 45 * MB)
    assert "busy (50.00 MB, 1 running)" in e.value.message and "idle" in e.value.message
    gov.release("idle", 7)
    gov.release("busy", 8)
    assert gov.plan_load("new", 45 * MB) == ["idle"]  # now "idle" is the least recent


def test_a_model_larger_than_the_budget_never_loads():
    gov = Governor(100 * MB)
    with pytest.raises(InsufficientMemoryError) as e:
        gov.plan_load("huge", 101 * MB)
    assert "memory budget is 100.00 MB" in e.value.message and e.value.needed == 101 * MB


def test_max_loaded_evicts_even_when_memory_fits():
    gov = Governor(10_000 * MB, max_loaded=2)
    _loaded(gov, "a", MB, at=1)
    _loaded(gov, "b", MB, at=2)
    assert gov.plan_load("c", MB) == ["a"]
    gov.lease("a", 3)
    gov.lease("b", 3)
    with pytest.raises(InsufficientMemoryError):
        gov.plan_load("c", MB)


def test_a_loading_model_is_neither_evicted_nor_expired():
    gov = Governor(100 * MB)
    gov.reserve("loading", 60 * MB, 0, keep_alive_s=0)
    with pytest.raises(InsufficientMemoryError) as e:
        gov.plan_load("other", 50 * MB)
    assert "loading" in e.value.message
    assert gov.expired(now=1e9) == []


def test_keep_alive_expiry_follows_last_use_and_the_request_override():
    gov = Governor(100 * MB)
    _loaded(gov, "a", MB, at=0)  # keep-alive 300 s
    _loaded(gov, "b", MB, at=0)
    gov.lease("b", 10)
    assert gov.expired(299) == []
    assert gov.expired(301) == ["a"]  # b is busy: no expiry while it runs
    gov.release("b", 400, keep_alive_s=0)  # the request asked for keep_alive 0
    assert gov.expired(400) == ["a", "b"]
    gov.residents["a"].keep_alive_s = math.inf  # -1: forever
    assert gov.expired(1e12) == ["b"]


MODELS_TOML = """
[models."coder-7b"]
alias = ["coder", "gpt-4o-mini"]
context = 8192
draft = "coder-0.5b"
keep_alive = "30m"

[models."coder-7b".sampling]
temperature = 0.2
top_p = 0.9

[models.small]
alias = "tiny"
keep_alive = -1
"""


def test_models_toml_is_read(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML)
    settings = load_settings(path)
    coder = settings["coder-7b"]
    assert coder.aliases == ("coder", "gpt-4o-mini") and coder.context == 8192
    assert coder.draft == "coder-0.5b" and coder.keep_alive_s == 1800
    assert coder.sampling == {"temperature": 0.2, "top_p": 0.9}
    assert settings["small"].aliases == ("tiny",) and settings["small"].keep_alive_s == math.inf
    assert load_settings(tmp_path / "absent.toml") == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [('[models.a]\ncontext = "long"', "context"), ("[models.a]\ncolour = 1", "colour"),
     ('[models.a]\nkeep_alive = "soon"', "keep_alive"),
     ('[models.a.sampling]\ntemperature = "hot"', "sampling.temperature"),
     ("[models.a.sampling]\nbeam = 2", "sampling.beam"), ("[models.a\n", "cannot read")],
)  # fmt: skip
def test_models_toml_mistakes_name_the_file_and_key(tmp_path, text, key):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError) as e:
        load_settings(path)
    assert str(path) in e.value.message and key in e.value.message
