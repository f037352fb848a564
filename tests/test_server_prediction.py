"""Predicted Outputs (OpenAI's `prediction`) through the official `openai` client against a real
server: the answer is the one given without a prediction (greedy), usage reports accepted and
rejected prediction tokens, and a malformed prediction is an OpenAI-style 400."""

from __future__ import annotations

import httpx
import openai
import pytest

from mlxrun.spec_step import SpecConfig
from serverutil import MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

GREEDY = {"temperature": 0, "max_tokens": 40}
MESSAGES = [{"role": "user", "content": "Rename the variable x to count in this file."}]


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    # k fixed: what is verified does not depend on the step times of this machine (adaptive k
    # is tested in test_spec_adaptive.py and test_speculate.py).
    spec = SpecConfig(adaptive=False)
    with serve_in_thread(make_app(tiny_llama, speculate=spec)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, **GREEDY, **kw)


def _edit(text: str) -> str:
    """The text with every fifth word replaced: a prediction that is mostly right."""
    words = text.split(" ")
    return " ".join("EDITED" if i % 5 == 4 else w for i, w in enumerate(words))


def _details(usage) -> tuple[int, int]:
    d = usage.completion_tokens_details
    return d.accepted_prediction_tokens, d.rejected_prediction_tokens


def test_chat_prediction_gives_the_plain_answer_and_reports_usage(client):
    plain = _chat(client)
    text = plain.choices[0].message.content
    assert len(text) > 20 and _details(plain.usage) == (0, 0)
    same = _chat(client, prediction={"type": "content", "content": text})
    assert same.choices[0].message.content == text
    accepted, rejected = _details(same.usage)
    assert accepted > plain.usage.completion_tokens // 2
    edited = _chat(client, prediction={"type": "content", "content": _edit(text)})
    assert edited.choices[0].message.content == text
    accepted_e, rejected_e = _details(edited.usage)
    assert accepted_e > 0 and rejected_e > rejected


def test_text_parts_and_streaming_report_the_same(client):
    text = _chat(client).choices[0].message.content
    parts = [{"type": "text", "text": text[:10]}, {"type": "text", "text": text[10:]}]
    stream = _chat(
        client,
        prediction={"type": "content", "content": parts},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert _details(chunks[-1].usage)[0] > 0


def test_completions_take_a_prediction_too(client):
    kw = {"model": MODEL_ID, "prompt": "def count(items):", **GREEDY}
    plain = client.completions.create(**kw).choices[0].text
    out = client.completions.create(
        **kw, extra_body={"prediction": {"type": "content", "content": _edit(plain)}}
    )
    assert out.choices[0].text == plain
    assert _details(out.usage)[0] > 0


def test_a_stop_string_cuts_a_predicted_answer_where_it_cuts_the_plain_one(client):
    text = _chat(client).choices[0].message.content
    stop = text[15:19]
    plain = _chat(client, stop=[stop])
    predicted = _chat(client, stop=[stop], prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    assert predicted.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("prediction", "param"),
    [
        ("just text", "prediction"),
        ({"type": "text", "content": "x"}, "prediction.type"),
        ({"type": "content"}, "prediction.content"),
        ({"type": "content", "content": 5}, "prediction.content"),
        ({"type": "content", "content": []}, "prediction.content"),
        ({"type": "content", "content": [{"type": "image_url"}]}, "prediction.content[0]"),
        (
            {"type": "content", "content": [{"type": "text", "text": 3}]},
            "prediction.content[0].text",
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_malformed_prediction_is_an_openai_400(base_url, prediction, param, path):
    body = {"model": MODEL_ID, "prediction": prediction, "max_tokens": 2}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
    r = httpx.post(base_url + path, json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "prediction" in error["message"]


def test_the_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, prediction={"type": "content", "content": 5})
    assert e.value.body["param"] == "prediction.content"
