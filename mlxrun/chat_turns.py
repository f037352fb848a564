"""System messages after the conversation has started, for templates that cannot place them.

Clients put system messages anywhere: Claude Code sends one after the user turn. Templates differ:
ChatML and Llama 3 render a system turn wherever it stands; Mistral and Gemma raise ("roles must
alternate"); others drop it, or render it as if it were another role (Llama 2 makes it an
assistant reply). So a late system message is kept where the template renders it as a system turn
of its own, and otherwise folded into the neighbouring user turn, where every template reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Messages = Sequence[Mapping[str, Any]]


def late_system(messages: Messages) -> list[int]:
    """Indices of the system messages that come after the first other message."""
    started, late = False, []
    for i, m in enumerate(messages):
        if m.get("role") != "system":
            started = True
        elif started:
            late.append(i)
    return late


def renders_late_system(render: Callable[[Messages], str], messages: Messages) -> bool:
    """Whether the template gives each late system message a turn of its own: it renders without
    error, keeps their text, and the prompt differs from the one it writes with those messages as
    user or assistant turns (a template that treats them as one of those would not notice)."""
    late = late_system(messages)
    try:
        text = render(messages)
    except Exception:  # noqa: BLE001 - any template error means "not here"
        return False
    if not all(str(messages[i].get("content") or "").strip() in text for i in late):
        return False
    for role in ("user", "assistant"):
        recast = [{**m, "role": role} if i in late else m for i, m in enumerate(messages)]
        try:
            if render(recast) == text:
                return False
        except Exception:  # noqa: BLE001, S112 - a template that refuses the recast one differs
            continue
    return True


def fold_system(messages: Messages) -> list[dict[str, Any]]:
    """Leading system messages as one; each later one joined to the neighbouring user turn (the
    next message, else the previous one), or made a user turn where no user turn is beside it."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # late system text waiting for the next user turn
    for i, m in enumerate(messages):
        content = str(m.get("content") or "")
        if m.get("role") != "system" or all(x.get("role") == "system" for x in out):
            if out and m.get("role") == "system":  # a second leading system message
                out[-1] = {**out[-1], "content": _join(out[-1]["content"], content)}
                continue
            m = dict(m)
            if pending and m.get("role") == "user":
                m["content"] = _join(*pending, str(m.get("content") or ""))
                pending = []
            elif pending:
                out.append({"role": "user", "content": _join(*pending)})
                pending = []
            out.append(m)
            continue
        following = messages[i + 1] if i + 1 < len(messages) else None
        if following is not None and following.get("role") == "user":
            pending.append(content)
        elif out and out[-1].get("role") == "user":
            out[-1] = {**out[-1], "content": _join(str(out[-1].get("content") or ""), content)}
        else:
            pending.append(content)
    if pending:
        out.append({"role": "user", "content": _join(*pending)})
    return out


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)
