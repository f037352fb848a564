"""Constrained decoding: grammars compile (or fail with the feature named), and in the engine a
constrained request always produces valid output, also batched beside unconstrained requests that
stay exactly as they would be alone."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest

from mlxrun.constrain import GrammarCompiler, allowed_mask
from mlxrun.engine import Engine, EngineConfig, Request
from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import SamplingParams

pytestmark = pytest.mark.model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama")))


@pytest.fixture(scope="module")
def compiler(lm):
    return GrammarCompiler(lm[1])


def _engine(lm) -> Engine:
    return Engine(lm[0], EngineConfig(eos_token_ids=lm[2].eos_token_ids)).start()


def _text(lm, events) -> tuple[str, str | None]:
    ids = [t for e in events for t in e.new_token_ids]
    return lm[1].decode(ids), events[-1].finish_reason


@pytest.mark.parametrize(
    ("schema", "feature"),
    [
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"$ref": "#/definitions/missing"}, "/definitions/missing"),
    ],
)
def test_unsupported_schema_features_are_named(compiler, schema, feature):
    with pytest.raises(InvalidRequestError) as e:
        compiler.json_schema(schema, param="response_format")
    assert e.value.param == "response_format"
    assert feature in str(e.value)


def test_bad_grammar_is_a_typed_error(compiler):
    with pytest.raises(InvalidRequestError) as e:
        compiler.lark("start: undefined_rule", param="grammar")
    assert e.value.param == "grammar"


def test_random_walks_through_the_mask_always_validate(lm, compiler):
    """Any path the mask allows ends in JSON that validates: the property the engine relies on."""
    tokenizer = lm[1]
    rng = random.Random(0)
    for _ in range(5):
        c = compiler.json_schema(SCHEMA, "response_format")
        ids: list[int] = []
        for _ in range(300):
            allowed = np.flatnonzero(allowed_mask([c], tokenizer.vocab_size)[0])
            token = int(rng.choice(allowed))
            if token in tokenizer.eos_token_ids:
                break
            ids.append(token)
            c.advance(token)
        assert c.done
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)


def test_mask_width_follows_the_logits(compiler):
    c = compiler.json_object("response_format")
    mask = allowed_mask([c, None], c.vocab_size + 40)
    assert mask.shape == (2, c.vocab_size + 40)
    assert not mask[0, c.vocab_size :].any() and mask[1].all()
    assert 0 < mask[0].sum() < c.vocab_size


def test_constrained_requests_in_a_batch_beside_unconstrained_ones(lm, compiler):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 17, 99, 230 + i] for i in range(4)]
    with _engine(lm) as engine:
        alone = [
            [t for e in engine.generate_sync(Request(f"a{i}", p, greedy)) for t in e.new_token_ids]
            for i, p in enumerate(prompts)
        ]
        requests = []
        for i, p in enumerate(prompts):
            requests.append(Request(f"u{i}", p, greedy))
            sampled = SamplingParams(temperature=1.0, seed=i, max_tokens=200)
            requests.append(
                Request(f"c{i}", p, sampled, constraint=compiler.json_schema(SCHEMA, "rf"))
            )
            requests.append(Request(f"o{i}", p, sampled, constraint=compiler.json_object("rf")))
        streams = [engine.submit_sync(r) for r in requests]
        results = {s.id: list(s) for s in streams}
    for i in range(len(prompts)):
        assert [t for e in results[f"u{i}"] for t in e.new_token_ids] == alone[i]
        text, finish = _text(lm, results[f"c{i}"])
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        # Free-form objects on random weights may run to max_tokens: then every token must still
        # have been allowed (a fresh matcher takes them all).
        text, finish = _text(lm, results[f"o{i}"])
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            check = compiler.json_object("rf")
            for t in (t for e in results[f"o{i}"] for t in e.new_token_ids):
                check.advance(t)
            assert check.error is None and text.startswith("{")


def test_a_gbnf_grammar_is_followed(lm, compiler):
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    with _engine(lm) as engine:
        for seed in range(4):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=20)
            c = compiler.lark(grammar, "grammar")
            text, finish = _text(
                lm, list(engine.generate_sync(Request(f"g{seed}", [7, 8], params, constraint=c)))
            )
            assert finish == "stop"
            assert text in ("yes", "no") or (text.startswith("maybe ") and text[-1].isdigit())
