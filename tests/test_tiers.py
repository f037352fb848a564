"""The tier rules (tests/tiers.py) hold: checked on small pytest sessions run in process.

The guard tests build a model or an app inside the inner session, so they are not pure themselves
(an outer pure guard would refuse the inner positive control).
"""

from __future__ import annotations

import pytest

INI = """
[pytest]
markers =
    pure: p
    model: m
    server: s
"""

# The inner sessions' stand-in for the checkpoint fixture: the rule is about the name.
FAKE_CHECKPOINT = """
import pytest

@pytest.fixture
def tiny_llama(tmp_path):
    return tmp_path
"""


def run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makeini(INI)
    pytester.makepyfile(FAKE_CHECKPOINT + source)
    return pytester.runpytest("-p", "tiers", "-p", "no:cacheprovider")


@pytest.mark.pure
def test_this_session_checks_tiers(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.has_plugin("tiers")
    assert request.node.get_closest_marker("pure") is not None


@pytest.mark.pure
def test_a_test_without_a_tier_stops_collection(pytester: pytest.Pytester) -> None:
    result = run(pytester, "def test_forgot():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_forgot: needs exactly one tier*has none"])


@pytest.mark.pure
def test_two_tiers_stop_collection(pytester: pytest.Pytester) -> None:
    source = "pytestmark = pytest.mark.pure\n\n@pytest.mark.model\ndef test_both():\n    pass\n"
    result = run(pytester, source)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_both: needs exactly one tier*has model, pure"])


@pytest.mark.pure
def test_a_pure_test_may_not_ask_for_a_checkpoint(pytester: pytest.Pytester) -> None:
    source = "@pytest.mark.pure\ndef test_sneaky(tiny_llama):\n    pass\n"
    result = run(pytester, source)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_sneaky: marked pure but uses tiny_llama"])


@pytest.mark.pure
def test_one_tier_each_runs(pytester: pytest.Pytester) -> None:
    source = "\n".join(
        f"@pytest.mark.{tier}\ndef test_{tier}():\n    pass\n"
        for tier in ("pure", "model", "server")
    )
    run(pytester, source).assert_outcomes(passed=3)


MODEL = """
def build():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=1,
                           intermediate_size=32, num_attention_heads=2, rms_norm_eps=1e-5,
                           vocab_size=32, num_key_value_heads=2)
    return llama.Model(args)

@pytest.mark.pure
def test_pure_builds_a_model():
    build()

@pytest.mark.model
def test_model_builds_a_model():
    assert build().layers

@pytest.mark.pure
def test_pure_asks_for_a_checkpoint_late(request):
    request.getfixturevalue("tiny_llama")
"""


@pytest.mark.model
def test_a_pure_test_that_builds_a_model_fails(pytester: pytest.Pytester) -> None:
    result = run(pytester, MODEL)
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            # pytest reports teardown errors before failures
            "*NotPureError: a pure test asked for tiny_llama: mark it model",
            "*NotPureError: a pure test built mlx_lm.models.llama.Model: mark it model",
        ],
        consecutive=False,
    )


SERVER = """
from starlette.applications import Starlette
import uvicorn

@pytest.mark.pure
def test_pure_builds_an_app():
    Starlette()

@pytest.mark.pure
def test_pure_builds_a_server():
    uvicorn.Server(uvicorn.Config(app=None))

@pytest.mark.server
def test_server_builds_both():
    uvicorn.Server(uvicorn.Config(app=Starlette()))
"""


@pytest.mark.server
def test_a_pure_test_that_builds_a_server_fails(pytester: pytest.Pytester) -> None:
    result = run(pytester, SERVER)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*NotPureError: a pure test built an HTTP app*",
            "*NotPureError: a pure test built a uvicorn server*",
        ],
        consecutive=False,
    )
