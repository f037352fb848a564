"""`mlxrun doctor [URL]`: replay what editors send to a running server, report pass/fail per
client (and what the model lacks, apart from failures), and print a config snippet for each. The checks live in mlxrun.doctor.checks, the
machinery that runs them in mlxrun.doctor.probe.
"""

from __future__ import annotations

import json
import sys

import click

from mlxrun.cli.common import friendly_errors, report_error
from mlxrun.doctor import codex as doctor_codex
from mlxrun.doctor.checks import CLIENTS
from mlxrun.doctor.probe import Ctx, discover, measured, run_clients
from mlxrun.errors import MlxrunError

DEFAULT_URL = "http://127.0.0.1:8080"  # where `mlxrun serve` listens by default


# ---------------------------------------------------------------- config snippets


def _continue(model: str, v1: str, size: int, out: int, keyed: bool, tools: bool,
              fim: bool) -> list[str]:  # fmt: skip
    """Chat roles on one entry; autocomplete on a second one that sends FIM prompts to
    /v1/completions (useLegacyCompletionsEndpoint), as Continue needs for a server like ours."""

    def entry(name: str) -> list[str]:
        key = "${{ secrets.MLXRUN_API_KEY }}" if keyed else "mlxrun"
        return [f"  - name: {json.dumps(name)}", "    provider: openai",
                f"    model: {json.dumps(model)}", f"    apiBase: {v1}", f"    apiKey: {key}"]  # fmt: skip

    lines = ["name: mlxrun", "version: 0.0.1", "schema: v1", "models:",
             *entry(f"{model} (mlxrun)"), "    roles: [chat, edit, apply]",
             *(["    capabilities: [tool_use]"] if tools else []),
             "    defaultCompletionOptions:", f"      contextLength: {size}",
             f"      maxTokens: {out}"]  # fmt: skip
    if fim:
        lines += [*entry(f"{model} autocomplete (mlxrun)"),
                  "    useLegacyCompletionsEndpoint: true  # FIM prompts go to /v1/completions",
                  "    roles: [autocomplete]"]  # fmt: skip
    return lines


def snippets(url: str, model: str, card: dict, keyed: bool,
             caps: dict[str, bool | None]) -> dict[str, dict[str, str]]:  # fmt: skip
    """{where, text} per client, shaped by the capabilities doctor measured (`caps`: tools and
    fim; None where unknown, which leaves tools on and autocomplete out). With a key on the
    server, clients that can read it from MLXRUN_API_KEY do; with none a placeholder stands in
    (most clients insist on some key)."""
    v1, size = f"{url}/v1", int(card.get("context_length") or 4096)
    out = max(1, min(int(card.get("max_output_tokens") or size), 4096, size // 2))
    key = '"$MLXRUN_API_KEY"' if keyed else "mlxrun"
    tools, fim = caps.get("tools") is not False, bool(caps.get("fim"))
    name = f"{model} (mlxrun)"
    zed = {"language_models": {"openai_compatible": {"mlxrun": {"api_url": v1, "available_models": [
        {"name": model, "display_name": name, "max_tokens": size, "max_output_tokens": out,
         "capabilities": {"tools": tools, "images": False, "parallel_tool_calls": False,
                          "prompt_cache_key": False}}]}}}}  # fmt: skip
    aider = {f"openai/{model}": {"max_input_tokens": size - out, "max_output_tokens": out,
             "input_cost_per_token": 0, "output_cost_per_token": 0, "litellm_provider": "openai",
             "mode": "chat"}}  # fmt: skip
    custom = [{"name": "mlxrun", "vendor": "customendpoint", "models": [
        {"id": model, "name": name, "url": f"{v1}/chat/completions", "toolCalling": tools,
         "vision": False, "maxInputTokens": size - out, "maxOutputTokens": out}]}]  # fmt: skip
    ollama = ("// (its Ollama provider sends no API key: use the Custom Endpoint)" if keyed
              else f'"github.copilot.chat.byok.ollamaEndpoint": "{url}"')  # fmt: skip
    where_continue = "~/.continue/config.yaml" + (" (the key in ~/.continue/.env)" if keyed else "")
    no_tools = [] if tools else ["# the model has no tool calling, which Claude Code's agent needs"]
    texts = {
        "continue": (where_continue, _continue(model, v1, size, out, keyed, tools, fim)),
        "zed": ("settings.json; Zed reads the key from MLXRUN_API_KEY (any value if none)",
                [json.dumps(zed, indent=2)]),
        "aider": ("command line, and .aider.model.metadata.json for the context size", [
            f"aider --model openai/{model} --openai-api-base {v1} --openai-api-key {key}",
            json.dumps(aider, indent=2)]),
        "cline": ("Cline settings", [
            "API Provider:        OpenAI Compatible", f"Base URL:            {v1}",
            "API Key:             " + ("(your MLXRUN_API_KEY)" if keyed else "mlxrun"),
            f"Model ID:            {model}", f"Context Window Size: {size}"]),
        "claude-code": ("shell, or the env block of ~/.claude/settings.json", [*no_tools,
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


def _verdict(client: dict) -> str:
    if not client["ok"]:
        return "FAIL"
    return (
        f"works, but the model lacks {' and '.join(client['lacks'])}" if client["lacks"] else "pass"
    )


def _summary(clients: list[dict]) -> str:
    full = sum(c["ok"] and not c["lacks"] for c in clients)
    limited = sum(c["ok"] and bool(c["lacks"]) for c in clients)
    failed = sum(not c["ok"] for c in clients)
    text = f"{full} of {len(clients)} clients pass"
    if limited:
        text += f", {limited} limited by what the model lacks (not a server fault)"
    return text + (f", {failed} FAIL" if failed else "") + "."


def _print(report: dict) -> None:
    labels = {"pass": "ok", "fail": "FAIL", "skip": "skip", "unsupported": "n/a"}
    click.echo(f"mlxrun doctor: {report['url']}, model {report['model']}")
    for client in report["clients"]:
        click.echo(f"\n{client['name']}: {_verdict(client)}")
        for c in client["checks"]:
            detail = f" -> {c['detail']}" if c["detail"] else ""
            click.echo(f"  {labels[c['status']]:<4}  {c['name']}: {c['sent']}{detail}")
    click.echo(f"\n{_summary(report['clients'])}\n\nConfig snippets")
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
    pass/fail per client and a config snippet for each, shaped by what the model turned out to
    support. A capability the model lacks (tools, fill-in-the-middle) is reported as such
    ("n/a"), not as a failure. Exit status: 0 no check failed, 1 a check failed (the server is
    at fault), 2 the server cannot be reached.
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
    caps = measured(ctx, results)
    texts = snippets(url, ctx.model, ctx.card, bool(ctx.api_key), caps)
    clients_out = [{**c, "snippet": texts[c["client"]]} for c in results]
    report = {"url": url, "model": ctx.model, "ok": all(c["ok"] for c in results),
              "capabilities": caps, "clients": clients_out}  # fmt: skip
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    doctor_cmd()
