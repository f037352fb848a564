"""`mlxrun doctor [URL]`: replay what editors send to a running server, report pass/fail per
client, and print a config snippet for each. The checks live in mlxrun.doctor_checks, the
machinery that runs them in mlxrun.doctor.
"""

from __future__ import annotations

import json
import sys

import click

from mlxrun import doctor_codex
from mlxrun.cli_common import friendly_errors, report_error
from mlxrun.doctor import Ctx, discover, run_clients
from mlxrun.doctor_checks import CLIENTS
from mlxrun.errors import MlxrunError

DEFAULT_URL = "http://127.0.0.1:8080"  # where `mlxrun serve` listens by default


# ---------------------------------------------------------------- config snippets


def snippets(url: str, model: str, card: dict, keyed: bool) -> dict[str, dict[str, str]]:
    """{where, text} per client. With a key on the server, clients that can read it from
    MLXRUN_API_KEY do; with none a placeholder stands in (most clients insist on some key)."""
    v1, size = f"{url}/v1", int(card.get("context_length") or 4096)
    out = max(1, min(int(card.get("max_output_tokens") or size), 4096, size // 2))
    key = '"$MLXRUN_API_KEY"' if keyed else "mlxrun"
    fim = (card.get("capabilities") or {}).get("fim")
    roles = "chat, edit, apply" + (", autocomplete" if fim else "")
    name = f"{model} (mlxrun)"
    zed = {"language_models": {"openai_compatible": {"mlxrun": {"api_url": v1, "available_models": [
        {"name": model, "display_name": name, "max_tokens": size, "max_output_tokens": out,
         "capabilities": {"tools": True, "images": False, "parallel_tool_calls": False,
                          "prompt_cache_key": False}}]}}}}  # fmt: skip
    aider = {f"openai/{model}": {"max_input_tokens": size - out, "max_output_tokens": out,
             "input_cost_per_token": 0, "output_cost_per_token": 0, "litellm_provider": "openai",
             "mode": "chat"}}  # fmt: skip
    custom = [{"name": "mlxrun", "vendor": "customendpoint", "models": [
        {"id": model, "name": name, "url": f"{v1}/chat/completions", "toolCalling": True,
         "vision": False, "maxInputTokens": size - out, "maxOutputTokens": out}]}]  # fmt: skip
    ollama = ("// (its Ollama provider sends no API key: use the Custom Endpoint)" if keyed
              else f'"github.copilot.chat.byok.ollamaEndpoint": "{url}"')  # fmt: skip
    where_continue = "~/.continue/config.yaml" + (" (the key in ~/.continue/.env)" if keyed else "")
    texts = {
        "continue": (where_continue, [
            "name: mlxrun", "version: 0.0.1", "schema: v1", "models:",
            f"  - name: {json.dumps(name)}", "    provider: openai",
            f"    model: {json.dumps(model)}",
            f"    apiBase: {v1}",
            "    apiKey: " + ("${{ secrets.MLXRUN_API_KEY }}" if keyed else "mlxrun"),
            f"    roles: [{roles}]", "    capabilities: [tool_use]",
            "    defaultCompletionOptions:",
            f"      contextLength: {size}", f"      maxTokens: {out}"]),
        "zed": ("settings.json; Zed reads the key from MLXRUN_API_KEY (any value if none)",
                [json.dumps(zed, indent=2)]),
        "aider": ("command line, and .aider.model.metadata.json for the context size", [
            f"aider --model openai/{model} --openai-api-base {v1} --openai-api-key {key}",
            json.dumps(aider, indent=2)]),
        "cline": ("Cline settings", [
            "API Provider:        OpenAI Compatible", f"Base URL:            {v1}",
            "API Key:             " + ("(your MLXRUN_API_KEY)" if keyed else "mlxrun"),
            f"Model ID:            {model}", f"Context Window Size: {size}"]),
        "claude-code": ("shell, or the env block of ~/.claude/settings.json", [
            f"export ANTHROPIC_BASE_URL={url}", f"export ANTHROPIC_AUTH_TOKEN={key}",
            f"export ANTHROPIC_MODEL={model}",
            f"export ANTHROPIC_DEFAULT_HAIKU_MODEL={model}  # background tasks",
            f"export ANTHROPIC_SMALL_FAST_MODEL={model}  # the same, on older versions",
            "unset ANTHROPIC_API_KEY  # it would win over the token"]),
        "copilot": ("VS Code: the Ollama endpoint, or a Custom Endpoint model", [
            "// settings.json", ollama, "// chatLanguageModels.json (Chat: Manage Language Models "
            "> Add Models > Custom Endpoint; it asks for the key)", json.dumps(custom, indent=2)]),
        "codex": doctor_codex.snippet(v1, model, size, keyed),
    }  # fmt: skip
    return {k: {"where": where, "text": "\n".join(lines)} for k, (where, lines) in texts.items()}


# ---------------------------------------------------------------- the command


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return ("" if "://" in url else "http://") + url.removesuffix("/v1")


def _give_up(error: MlxrunError, code: int, url: str, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps({"url": url, "ok": False, "error": error.message, "hint": error.hint})
        )
    report_error(error)
    sys.exit(code)


def _print(report: dict) -> None:
    labels = {"pass": "ok", "fail": "FAIL", "skip": "skip"}
    click.echo(f"mlxrun doctor: {report['url']}, model {report['model']}")
    for client in report["clients"]:
        click.echo(f"\n{client['name']}: {'pass' if client['ok'] else 'FAIL'}")
        for c in client["checks"]:
            detail = f" -> {c['detail']}" if c["detail"] else ""
            click.echo(f"  {labels[c['status']]:<4}  {c['name']}: {c['sent']}{detail}")
    passed = sum(c["ok"] for c in report["clients"])
    click.echo(f"\n{passed} of {len(report['clients'])} clients pass.\n\nConfig snippets")
    for client in report["clients"]:
        click.echo(f"\n== {client['name']}: {client['snippet']['where']} ==")
        click.echo(client["snippet"]["text"])


@click.command("doctor")
@click.argument("url", default=DEFAULT_URL, required=False)
@click.option("--api-key", envvar="MLXRUN_API_KEY", default=None,
              help="The server's API key (or set MLXRUN_API_KEY).")  # fmt: skip
@click.option("--model", default=None, help="Model id to test (default: the first one listed).")
@click.option("--client", "clients", multiple=True, help="Test only this client (repeatable).",
              type=click.Choice(list(CLIENTS), case_sensitive=False))  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds to wait for each answer.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
def doctor_cmd(url: str, api_key: str | None, model: str | None, clients: tuple[str, ...],
               timeout: float, as_json: bool) -> None:  # fmt: skip
    """Check that editors can use the server at URL (default http://127.0.0.1:8080).

    Replays the requests Continue, Zed, Aider, Cline, Claude Code and GitHub Copilot send, prints
    pass/fail per client and a config snippet for each. Exit status: 0 all pass, 1 a check
    failed, 2 the server cannot be reached.
    """
    import httpx

    url = _base_url(url)
    wanted = {c.lower() for c in clients}
    with httpx.Client(base_url=url, timeout=timeout) as http:
        ctx = Ctx(http, api_key or None, model or "", {})
        try:
            ctx.model, ctx.card = discover(ctx, url, model)
        except httpx.TransportError as e:
            why = f"no answer within {timeout:g} s" if isinstance(e, httpx.TimeoutException) else e
            error = MlxrunError(f"cannot reach the server at {url}: {str(why) or type(e).__name__}",
                                hint="start it with `mlxrun serve MODEL`")  # fmt: skip
            _give_up(error, 2, url, as_json)
        except MlxrunError as e:
            _give_up(e, 1, url, as_json)
        results = run_clients(ctx, {k: v for k, v in CLIENTS.items() if not wanted or k in wanted})
    texts = snippets(url, ctx.model, ctx.card, bool(ctx.api_key))
    clients_out = [{**c, "snippet": texts[c["client"]]} for c in results]
    report = {"url": url, "model": ctx.model, "ok": all(c["ok"] for c in results),
              "clients": clients_out}  # fmt: skip
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    doctor_cmd()
