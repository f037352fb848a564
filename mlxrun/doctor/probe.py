"""The machinery of `mlxrun doctor`: assertions on answers, the HTTP helpers that send a client's
request shapes, and running a client's checks into a report. The checks themselves live in
mlxrun.doctor.checks, the command in mlxrun.cli.doctor.

A check ends in one of four statuses: pass; fail (the server broke what the client parses);
skip (the check does not apply, e.g. a client that cannot send the key); unsupported (the model
lacks a capability the check needs: the server refused it cleanly, or says so itself). Only
fail means the server is at fault.

Light to import (the CLI's --help loads it): httpx is imported only where a request is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from mlxrun.errors import MlxrunError

if TYPE_CHECKING:
    import httpx

NONE = type(None)
TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object", NONE: "null"}


class Failure(Exception):
    """The answer breaks what the client parses; `status` is the HTTP status of a refusal."""

    def __init__(self, why: str, status: int | None = None):
        super().__init__(why)
        self.status = status


class Skip(Exception):
    """The check does not apply here."""


class Lacks(Exception):
    """The model lacks `capability` (as the server reports it): no fault of the server's."""

    def __init__(self, capability: str, why: str):
        super().__init__(why)
        self.capability = capability


CAPABILITIES = ("tools", "fim")  # what checks may need and snippets are shaped by


def expect(ok: Any, why: str) -> None:
    if not ok:
        raise Failure(why)


def short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def parse(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise Failure(f"not JSON: {short(data)}") from None


def at(obj: Any, path: str) -> Any:
    """The value at a dotted path (keys may hold dots themselves: general.architecture), or None."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    head, _, rest = path.partition(".")
    if isinstance(obj, list) and head.isdigit() and int(head) < len(obj):
        obj = obj[int(head)]
    else:
        obj = obj.get(head) if isinstance(obj, dict) else None
    return obj if not rest or obj is None else at(obj, rest)


def _label(want: Any) -> str:
    if isinstance(want, (type, tuple)):
        kinds = want if isinstance(want, tuple) else (want,)
        return " or ".join(TYPE_NAMES.get(t, t.__name__) for t in kinds)
    return "one of " + ", ".join(sorted(map(repr, want))) if isinstance(want, set) else repr(want)


def need(obj: Any, spec: dict[str, Any], what: str = "the answer") -> None:
    """Each dotted path holds a value of that type, one of that set, or equal to that value."""
    for path, want in spec.items():
        got = at(obj, path)
        if isinstance(want, (type, tuple)):
            ok = isinstance(got, want)
        else:
            ok = got in want if isinstance(want, set) else got == want
        shown = "missing" if got is None else short(got)
        expect(ok, f"{what}: {path} is {shown}, want {_label(want)}")


# ---------------------------------------------------------------- HTTP


@dataclass
class Ctx:
    http: httpx.Client
    api_key: str | None
    model: str
    card: dict  # the model's /v1/models entry (capabilities, context_length)
    found: dict = field(default_factory=dict)  # what one check hands the next


def _headers(ctx: Ctx, extra: dict | None = None, auth: bool = True) -> dict[str, str]:
    out = {"Content-Type": "application/json", **(extra or {})}
    if auth and ctx.api_key:
        out["Authorization"] = f"Bearer {ctx.api_key}"
    return out


def _error_text(r: httpx.Response) -> str:
    """The server's error message, whole: its last sentence is often the fix."""
    try:
        err = r.json()
    except ValueError:
        return short(r.text.strip() or r.reason_phrase)
    err = err.get("error", err) if isinstance(err, dict) else err
    message = err.get("message", err) if isinstance(err, dict) else err
    return message if isinstance(message, str) and len(message) <= 400 else short(message)


def refused(r: httpx.Response) -> Failure:
    return Failure(f"HTTP {r.status_code}: {_error_text(r)}", r.status_code)


def request_json(ctx: Ctx, method: str, path: str, body: Any = None, headers: dict | None = None,
                 auth: bool = True) -> Any:  # fmt: skip
    r = ctx.http.request(method, path, json=body, headers=_headers(ctx, headers, auth))
    if r.status_code != 200:
        raise refused(r)
    return parse(r.text)


def sse_events(
    ctx: Ctx, path: str, body: Any, headers: dict | None = None
) -> list[tuple[str, str]]:
    """(event name, data) per server-sent event; a blank line ends each event."""
    events, name, data = [], "", []
    with ctx.http.stream("POST", path, json=body, headers=_headers(ctx, headers)) as r:
        if r.status_code != 200:
            r.read()
            raise refused(r)
        kind = r.headers.get("content-type", "")
        expect(kind.startswith("text/event-stream"), f"Content-Type is {kind!r}")
        for line in [*r.iter_lines(), ""]:
            if not line:
                if data:
                    events.append((name, "\n".join(data)))
                name, data = "", []
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    expect(events, "the stream is empty")
    return events


class Check(NamedTuple):
    name: str
    sent: str
    run: Callable[[Ctx], Any]
    needs: str = ""  # a capability of the model's (CAPABILITIES) the check exercises


Client = tuple[str, list[Check]]  # (title, checks) per client key


def declared(ctx: Ctx, capability: str) -> bool | None:
    """What the model's /v1/models entry says of a capability (None: it says nothing)."""
    value = at(ctx.card, f"capabilities.{capability}")
    return value if isinstance(value, bool) else None


def _judge(check: Check, ctx: Ctx, error: Exception) -> tuple[str, str]:
    """(status, detail) for a check that did not pass. A capability the model lacks is
    "unsupported" when the server agrees with itself: it declared the lack and refused the
    request with a 4xx, or the check found the lack and the server did not claim otherwise."""
    if isinstance(error, Lacks):
        if declared(ctx, error.capability):
            return "fail", f"{error} although /v1/models says the model has {error.capability}"
        return "unsupported", str(error)
    status = getattr(error, "status", None)
    if check.needs and declared(ctx, check.needs) is False and status and 400 <= status < 500:
        return "unsupported", f"the model has no {check.needs}: {error}"
    return "fail", str(error)


def run_check(check: Check, ctx: Ctx) -> dict[str, str]:
    import httpx

    status, detail, needs = "pass", "", check.needs
    try:
        check.run(ctx)
    except Skip as e:
        status, detail = "skip", str(e)
    except Lacks as e:  # the check found the lack itself (e.g. in a capability list)
        status, detail = _judge(check, ctx, e)
        needs = e.capability
    except Failure as e:
        status, detail = _judge(check, ctx, e)
    except httpx.TimeoutException:
        status, detail = "fail", f"no answer within {ctx.http.timeout.read:g} s"
    except httpx.TransportError as e:
        status, detail = "fail", f"connection failed: {e}"
    except (LookupError, TypeError, AttributeError) as e:  # a shape no check foresaw
        status, detail = "fail", f"unexpected answer: {type(e).__name__}: {e}"
    out = {"name": check.name, "sent": check.sent, "status": status, "detail": detail}
    return out | ({"needs": needs} if needs else {})


def discover(ctx: Ctx, url: str, model: str | None) -> tuple[str, dict]:
    """The model to test (default: the first listed) and its /v1/models entry. Transport errors
    (nothing listening) pass through as httpx errors."""
    r = ctx.http.get("/v1/models", headers=_headers(ctx))
    if r.status_code == 401:
        what = "refused the API key" if ctx.api_key else "wants an API key"
        hint = "Pass --api-key KEY, or set MLXRUN_API_KEY, to the key it serves with."
        raise MlxrunError(f"the server at {url} {what}", hint=hint)
    try:
        expect(r.status_code == 200, f"HTTP {r.status_code}: {_error_text(r)}")
        models = parse(r.text)
        need(models, {"data": list})
    except Failure as e:
        hint = "Check that the URL points at `mlxrun serve`."
        raise MlxrunError(f"GET {url}/v1/models failed: {e}", hint=hint) from None
    cards = [m for m in models["data"] if isinstance(at(m, "id"), str)]
    if model is None and not cards:
        raise MlxrunError(f"the server at {url} lists no models", hint="Pass --model ID.")
    model = model or cards[0]["id"]
    return model, next((m for m in cards if m["id"] == model), {})


def run_clients(ctx: Ctx, clients: Mapping[str, Client]) -> list[dict[str, Any]]:
    """Each client's checks, in order. A client is ok when none of its checks fails; `lacks`
    names the capabilities of the model's it would need for the checks that were unsupported."""
    out = []
    for key, (title, checks) in clients.items():
        results = [run_check(check, ctx) for check in checks]
        ok = all(r["status"] != "fail" for r in results)
        lacks = sorted({r["needs"] for r in results if r["status"] == "unsupported"})
        out.append({"client": key, "name": title, "ok": ok, "lacks": lacks, "checks": results})
    return out


def measured(ctx: Ctx, clients: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Per capability: True when every check that exercised it passed, False when one did not,
    else what /v1/models declares (None: unknown). Snippets are shaped by this."""
    caps = {}
    for cap in CAPABILITIES:
        seen = [c["status"] for client in clients for c in client["checks"]
                if c.get("needs") == cap and c["status"] != "skip"]  # fmt: skip
        caps[cap] = all(s == "pass" for s in seen) if seen else declared(ctx, cap)
    return caps
