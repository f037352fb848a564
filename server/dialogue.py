"""The chat pipeline every dialect shares (OpenAI chat, Anthropic messages, Ollama chat).

In: neutral messages (OpenAI-shaped, see protocol_tools), tools, a ToolChoice and an OutputFormat.
`plan_chat` renders the template, fits the context and compiles the grammar each choice decodes
under: the tool-call grammar for tool_choice "required" or a named function, or the requested
JSON schema / JSON object / grammar. With tool_choice "none" the tools are left out of the prompt,
so the model is not invited to call them and nothing is parsed as a call.

Out: `message_deltas` turns each choice's text into reasoning, content and tool-call deltas
(reasoning split first, then calls parsed from the content); `collect_messages` runs to the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import SamplingParams

from .common import choice_params, fit_context, until_disconnect
from .errors import from_mlxrun, invalid
from .generation import ChoiceSpec, Generation
from .protocol_tools import OutputFormat, ToolChoice
from .state import ServerState

if TYPE_CHECKING:
    from mlxrun.parsing.reasoning import ReasoningFormat
    from mlxrun.parsing.tools import ToolCall, ToolCallDelta, ToolFormat

NO_TOOLS = ToolChoice("none")


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    specs: list[ChoiceSpec]
    tool_format: ToolFormat | None  # set when the output is parsed for tool calls
    tool_names: dict[str, dict]  # name -> parameters schema (key/value calls are read by it)
    reasoning: ReasoningFormat | None


@dataclass
class MessageDelta:
    index: int
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    calls: list[ToolCall] = field(default_factory=list)  # on the last delta: the complete calls

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.logprobs)


@dataclass
class Message:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    logprobs: list
    finish_reason: str


def plan_chat(
    state: ServerState,
    messages: Sequence[Mapping[str, Any]],
    params: SamplingParams,
    *,
    tools: list[dict] | None = None,
    choice: ToolChoice = NO_TOOLS,
    output: OutputFormat | None = None,
    n: int = 1,
    max_param: str = "max_tokens",
    template_kwargs: Mapping[str, Any] | None = None,
    priority: int = 0,
) -> ChatPlan:
    """Prompt ids and one ChoiceSpec per choice. Blocking (template, grammar): run it in a thread.
    Raises APIError 400 for what the model or the grammar engine cannot do."""
    tokenizer = state.tokenizer
    use_tools = bool(tools) and choice.mode != "none"
    fmt = state.tool_format if use_tools else None
    if use_tools and fmt is None:
        raise invalid(
            "This model's chat template does not support tools (it never mentions them). "
            "Serve it with --tool-parser to name its format, or send no tools.",
            "tools",
            code="unsupported_parameter",
        )
    from mlxrun.parsing.reasoning import detect_reasoning
    from mlxrun.parsing.tools import tool_schemas

    try:
        names = tool_schemas(tools) if use_tools else {}
        prompt_ids = tokenizer.apply_chat_template(
            list(messages), tools=tools if use_tools else None, **dict(template_kwargs or {})
        )
        # The prompt's end tells whether the template opened a thinking block already.
        reasoning = detect_reasoning(tokenizer, tokenizer.decode(prompt_ids[-8:]))
        if output is not None and output.kind != "grammar":
            reasoning = None  # a JSON grammar leaves no room for a thinking block
        constraint = None
        if use_tools or output is not None:
            constraint = _constraint(state, fmt, tools, choice, output, reasoning)
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None
    params = fit_context(state, len(prompt_ids), params, max_param, "messages")
    stops = (*params.stop, *tokenizer.chat_stop_strings)
    # Markers that are special tokens must survive detokenizing, or the parsers never see them.
    keep_special = any(
        tokenizer.is_special(i)
        for _, i in (*(fmt.token_ids if fmt else ()), *(reasoning.token_ids if reasoning else ()))
    )
    specs = [
        ChoiceSpec(
            prompt_ids,
            choice_params(params, i),
            stops,
            priority=priority,
            constraint=None if constraint is None else constraint.copy(),
            keep_special=keep_special,
        )
        for i in range(n)
    ]
    return ChatPlan(prompt_ids, specs, fmt, names, reasoning)


def _constraint(
    state: ServerState,
    fmt: ToolFormat | None,
    tools: list[dict] | None,
    choice: ToolChoice,
    output: OutputFormat | None,
    reasoning: ReasoningFormat | None,
) -> Any:
    forced = fmt is not None and choice.mode in ("required", "named")
    if forced and output is not None:
        raise invalid(
            f"'{output.param}' cannot be combined with a tool_choice that forces a tool call.",
            output.param,
        )
    if forced:
        from mlxrun.parsing.tools import tool_call_grammar

        assert tools is not None and fmt is not None
        lark = tool_call_grammar(fmt, tools, choice.name, choice.parallel, reasoning)
        return state.grammars.lark(lark, "tools")
    return format_constraint(state, output)


def format_constraint(state: ServerState, output: OutputFormat | None) -> Any:
    """The Constraint for a response format or grammar (None: free text). Blocking; raises
    InvalidRequestError naming what the grammar engine cannot enforce."""
    if output is None:
        return None
    compiler = state.grammars
    if output.kind == "json_object":
        return compiler.json_object(output.param)
    if output.kind == "json_schema":
        return compiler.json_schema(output.schema, output.param)
    return compiler.lark(output.grammar or "", output.param)


class MessageParser:
    """One choice's text -> (reasoning, content, tool-call deltas)."""

    def __init__(self, plan: ChatPlan):
        from mlxrun.parsing.reasoning import ReasoningParser
        from mlxrun.parsing.tools import ToolParser

        self.reasoning = ReasoningParser(plan.reasoning) if plan.reasoning else None
        self.tools = ToolParser(plan.tool_format, plan.tool_names) if plan.tool_format else None

    def push(self, text: str) -> tuple[str, str, list[ToolCallDelta]]:
        reasoning, content = self.reasoning.push(text) if self.reasoning else ("", text)
        return (reasoning, *self._content(content, final=False))

    def finish(self) -> tuple[str, str, list[ToolCallDelta]]:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        text, calls = self._content(content, final=False)
        more_text, more_calls = self._content("", final=True)
        return reasoning, text + more_text, calls + more_calls

    def _content(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        if self.tools is None:
            return text, []
        if final:
            return self.tools.finish()
        return self.tools.push(text) if text else ("", [])

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools else []


async def message_deltas(gen: Generation, plan: ChatPlan) -> AsyncIterator[MessageDelta]:
    """Each choice's deltas in arrival order; a choice's last one has its finish_reason
    ("tool_calls" when it called a tool and stopped by itself)."""
    parsers = [MessageParser(plan) for _ in plan.specs]
    async for d in gen.deltas():
        parser = parsers[d.index]
        reasoning, content, calls = parser.push(d.text)
        out = MessageDelta(d.index, content, reasoning, calls, d.logprobs)
        if d.finish_reason is not None:
            r, c, more = parser.finish()
            out.reasoning += r
            out.content += c
            out.tool_calls += more
            out.finish_reason = d.finish_reason
            out.calls = parser.calls
            if parser.calls and d.finish_reason == "stop":
                out.finish_reason = "tool_calls"
        if out or out.finish_reason is not None:
            yield out


async def collect_messages(request: Request, gen: Generation, plan: ChatPlan) -> list[Message]:
    """Run every choice to the end (or until the client leaves: 499)."""

    async def run() -> list[Message]:
        deltas: list[list[MessageDelta]] = [[] for _ in plan.specs]
        try:
            async for d in message_deltas(gen, plan):
                deltas[d.index].append(d)
        finally:
            await gen.aclose()
            gen.record_usage()
        return [
            Message(
                "".join(d.content for d in ds),
                "".join(d.reasoning for d in ds),
                # Complete calls only: one cut off by max_tokens came back as content.
                next((d.calls for d in ds if d.finish_reason), []),
                [lp for d in ds for lp in d.logprobs],
                next((d.finish_reason for d in ds if d.finish_reason), "stop"),
            )
            for ds in deltas
        ]

    return await until_disconnect(request, run())
