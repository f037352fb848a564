"""`mlxrun doctor` against real servers on loopback: the tiny model passes every client, an API
key is asked for and used, a closed port is one line and exit 2, a server that breaks a client's
stream fails that client's check by name, and a model that lacks tools or FIM is reported as
such (not as a failure) with snippets that do not claim what it lacks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mlxrun.cli.doctor import doctor_cmd
from mlxrun.doctor.checks import CLIENTS
from serverutil import MODEL_ID, make_app, serve_in_thread


def doctor(*args: str, env: dict | None = None):
    return CliRunner().invoke(doctor_cmd, list(args), env=env)


def _report(result) -> dict:
    report = json.loads(result.stdout)
    return {c["client"]: c for c in report["clients"]} | {"_": report}


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama)) as url:
        yield url


def test_every_client_passes_on_the_tiny_model(base_url):
    result = doctor(base_url, "--json")
    report = _report(result)
    failed = [
        f"{key}/{c['name']}: {c['detail']}"
        for key in CLIENTS
        for c in report[key]["checks"]
        if c["status"] != "pass"
    ]
    assert not failed, failed  # the fixture has tools and FIM tokens: nothing is skipped
    assert result.exit_code == 0 and report["_"]["ok"] and report["_"]["model"] == MODEL_ID
    for key in CLIENTS:
        text = report[key]["snippet"]["text"]
        assert MODEL_ID in text and base_url in text, (key, text)
    zed = json.loads(report["zed"]["snippet"]["text"])["language_models"]["openai_compatible"]
    assert zed["mlxrun"]["available_models"][0]["max_tokens"] == 512  # the served context
    # Snippets follow what was measured: this model has tools and FIM tokens.
    assert report["_"]["capabilities"] == {"tools": True, "fim": True}
    assert zed["mlxrun"]["available_models"][0]["capabilities"]["tools"] is True
    assert _copilot_model(report)["toolCalling"] is True
    chat, autocomplete = _continue_entries(report["continue"]["snippet"]["text"])
    assert "    roles: [chat, edit, apply]" in chat and "    capabilities: [tool_use]" in chat
    assert "useLegacyCompletionsEndpoint" not in "\n".join(chat)
    assert "    roles: [autocomplete]" in autocomplete
    assert any(line.startswith("    useLegacyCompletionsEndpoint: true") for line in autocomplete)


def _copilot_model(report: dict) -> dict:
    text = report["copilot"]["snippet"]["text"]
    return json.loads(text[text.index("\n[") :])[0]["models"][0]


def _continue_entries(text: str) -> list[list[str]]:
    """The lines of each model entry in a Continue config.yaml snippet."""
    entries: list[list[str]] = []
    for line in text.splitlines()[text.splitlines().index("models:") + 1 :]:
        if line.startswith("  - "):
            entries.append([])
        entries[-1].append(line)
    return entries


def test_human_report_one_line_per_check_and_snippets(base_url):
    result = doctor(base_url.removeprefix("http://") + "/v1/", "--client", "Aider")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Aider: pass" in lines
    assert "  ok    chat: POST /v1/chat/completions stream, no tools" in lines
    assert "Zed" not in result.stdout  # --client restricts
    command = f"aider --model openai/{MODEL_ID} --openai-api-base {base_url}/v1"
    assert any(line.startswith(command) for line in lines)


@pytest.fixture(scope="module")
def keyed_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, api_key="sekret")) as url:
        yield url


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def test_api_key_missing_wrong_and_given(keyed_url):
    result = doctor(keyed_url, env={"MLXRUN_API_KEY": ""})
    assert result.exit_code == 1 and result.stdout == ""
    line = _one_error_line(result.stderr)
    assert "wants an API key" in line and "--api-key" in line
    result = doctor(keyed_url, "--api-key", "wrong")
    assert result.exit_code == 1 and "refused the API key" in _one_error_line(result.stderr)

    args = ["--client", "claude-code", "--client", "copilot", "--json"]
    report = _report(doctor(keyed_url, "--api-key", "sekret", *args))
    assert report["_"]["ok"], report
    # Copilot's Ollama provider cannot send a key: its discovery is skipped, not failed.
    assert [c["status"] for c in report["copilot"]["checks"]] == ["skip"] * 3 + ["pass"]
    assert all(c["status"] == "pass" for c in report["claude-code"]["checks"])
    result = doctor(keyed_url, "--client", "claude-code", env={"MLXRUN_API_KEY": "sekret"})
    assert result.exit_code == 0, result.output
    assert "sekret" not in result.output  # snippets point at $MLXRUN_API_KEY instead
    assert 'ANTHROPIC_AUTH_TOKEN="$MLXRUN_API_KEY"' in result.stdout


def test_closed_port_is_one_line_and_exit_2():
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        command = [sys.executable, "-m", "mlxrun", "doctor", url, "--timeout", "5"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_error_line(proc.stderr)
    assert f"cannot reach the server at {url}" in line and "mlxrun serve MODEL" in line
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["ok"] is False


@pytest.fixture(scope="module")
def no_tools_url(checkpoint_factory):
    spm = checkpoint_factory("llama", tokenizer="spm")  # [INST] template, no tools, no FIM
    with serve_in_thread(make_app(spm)) as url:
        yield url


def test_a_model_without_fim_or_tools_is_not_a_server_failure(no_tools_url):
    """What the model lacks is "unsupported" with the server's whole message (its fix
    included); nothing fails, the exit status is 0, and no snippet claims tools or FIM."""
    result = doctor(no_tools_url, "--json")
    report = _report(result)
    assert result.exit_code == 0 and report["_"]["ok"], result.output
    assert report["_"]["capabilities"] == {"tools": False, "fim": False}
    checks = [(key, c) for key in CLIENTS for c in report[key]["checks"]]
    assert not [c for _, c in checks if c["status"] == "fail"]
    lacking = {(key, c["name"]): c for key, c in checks if c["status"] == "unsupported"}
    assert {("continue", "agent"), ("zed", "agent"), ("zed", "tool result"),
            ("cline", "native tools"), ("claude-code", "agent"), ("copilot", "agent"),
            ("copilot", "Ollama model info"), ("continue", "autocomplete"),
            ("continue", "autocomplete (FIM API)")} <= set(lacking)  # fmt: skip
    agent = lacking[("zed", "agent")]
    assert "HTTP 400" in agent["detail"] and "Serve it with --tool-parser" in agent["detail"]
    assert "fill-in-the-middle" in lacking[("continue", "autocomplete")]["detail"]
    assert report["aider"]["lacks"] == [] and report["aider"]["ok"]
    assert report["continue"]["lacks"] == ["fim", "tools"] and report["continue"]["ok"]

    zed = json.loads(report["zed"]["snippet"]["text"])["language_models"]["openai_compatible"]
    assert zed["mlxrun"]["available_models"][0]["capabilities"]["tools"] is False
    assert _copilot_model(report)["toolCalling"] is False
    text = report["continue"]["snippet"]["text"]
    assert "tool_use" not in text and "autocomplete" not in text
    assert len(_continue_entries(text)) == 1
    assert "no tool calling" in report["claude-code"]["snippet"]["text"]


def test_human_report_tells_a_lacking_model_from_a_failure(no_tools_url):
    result = doctor(no_tools_url, "--client", "zed", "--client", "aider")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Zed: works, but the model lacks tools" in lines and "Aider: pass" in lines
    agent = next(line for line in lines if line.startswith("  n/a   agent: "))
    assert agent.endswith("Serve it with --tool-parser to name its format, or send no tools.")
    assert "FAIL" not in result.stdout
    assert "1 of 2 clients pass, 1 limited by what the model lacks (not a server fault)." in lines


# ---------------------------------------------------------------- a server that breaks Zed


def _frame(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "broken", "object": "model"}]})


async def _chat(request: Request) -> StreamingResponse:
    """Tool-call arguments as an object instead of JSON text; plain streams stop without usage
    and without [DONE]."""
    body = await request.json()
    head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "broken"}

    async def chunks():
        if body.get("tool_choice"):
            function = {"name": "get_weather", "arguments": {"city": "Paris"}}  # not a string
            call = {"index": 0, "id": "call_1", "type": "function", "function": function}
            delta = {"role": "assistant", "tool_calls": [call]}
            yield _frame({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            yield _frame(
                {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
            )
            yield "data: [DONE]\n\n"
        else:
            delta = {"role": "assistant", "content": "hi"}
            yield _frame(
                {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": "stop"}]}
            )

    return StreamingResponse(chunks(), media_type="text/event-stream")


def test_a_broken_stream_fails_the_client_and_names_the_check():
    app = Starlette(routes=[Route("/v1/models", _models),
                            Route("/v1/chat/completions", _chat, methods=["POST"])])  # fmt: skip
    with serve_in_thread(app, wait=False) as url:
        report = _report(doctor(url, "--client", "zed", "--json"))
        result = doctor(url, "--client", "zed")
    assert report["_"]["model"] == "broken" and not report["_"]["ok"]
    agent, tool_result = report["zed"]["checks"]
    assert agent["status"] == tool_result["status"] == "fail"
    assert "function.arguments" in agent["detail"] and "a string" in agent["detail"]
    assert "does not end with data: [DONE]" in tool_result["detail"]
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "Zed: FAIL" in lines
    failing = [
        line for line in lines if line.startswith("  FAIL  agent: POST /v1/chat/completions")
    ]
    assert len(failing) == 1 and "-> a tool_calls delta: function.arguments" in failing[0]


async def _models_without_tools(request: Request) -> JSONResponse:
    card = {"id": "broken", "object": "model", "capabilities": {"tools": False}}
    return JSONResponse({"object": "list", "data": [card]})


async def _crash(request: Request) -> JSONResponse:
    return JSONResponse({"error": {"message": "Internal error", "type": "server_error"}}, 500)


def test_a_server_error_is_a_failure_even_where_the_model_lacks_the_capability():
    """A model without tools excuses a clean 4xx refusal, never a 500."""
    app = Starlette(routes=[Route("/v1/models", _models_without_tools),
                            Route("/v1/chat/completions", _crash, methods=["POST"])])  # fmt: skip
    with serve_in_thread(app, wait=False) as url:
        result = doctor(url, "--client", "zed", "--json")
    report = _report(result)
    assert result.exit_code == 1 and not report["_"]["ok"]
    assert [c["status"] for c in report["zed"]["checks"]] == ["fail", "fail"]
    assert "HTTP 500: Internal error" in report["zed"]["checks"][0]["detail"]


def test_codex_check_and_config(base_url):
    """Codex CLI: the Responses stream as Codex reads it, and a config.toml provider on the
    Responses wire API."""
    import tomllib

    report = _report(doctor(base_url, "--client", "codex", "--json"))
    codex = report["codex"]
    assert codex["ok"] and [c["status"] for c in codex["checks"]] == ["pass", "pass"], codex
    config = tomllib.loads(codex["snippet"]["text"])
    provider = config["model_providers"][config["model_provider"]]
    assert provider["wire_api"] == "responses" and provider["base_url"] == base_url + "/v1"
    assert config["model"] == MODEL_ID and "env_key" not in provider
    assert config["web_search"] == "disabled"  # Codex sends a web_search tool otherwise


async def _responses(request: Request) -> StreamingResponse:
    """A stream Codex cannot use: it stops after the item, without response.completed."""
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}  # fmt: skip
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    events = [{"type": "response.created", "response": response},
              {"type": "response.output_item.added", "output_index": 0, "item": item},
              {"type": "response.output_item.done", "output_index": 0, "item": item}]  # fmt: skip

    async def frames():
        for n, e in enumerate(events):
            yield f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


def test_a_responses_stream_without_completed_fails_codex():
    app = Starlette(routes=[Route("/v1/models", _models),
                            Route("/v1/responses", _responses, methods=["POST"])])  # fmt: skip
    with serve_in_thread(app, wait=False) as url:
        report = _report(doctor(url, "--client", "codex", "--json"))
    agent, tool_result = report["codex"]["checks"]
    assert agent["status"] == tool_result["status"] == "fail" and not report["_"]["ok"]
    assert "without response.completed" in tool_result["detail"], tool_result
