"""OpenAI Predicted Outputs: the `prediction` field of chat and completions requests.

    "prediction": {"type": "content", "content": "the text the answer will mostly repeat"}

`content` may also be an array of text parts ({"type": "text", "text": ...}), joined. The
prediction's tokens become the request's proposals (mlxrun.speculate.PredictionProposer): the
engine verifies them and the output is what it would be without them. Usage reports
`accepted_prediction_tokens` and `rejected_prediction_tokens`, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import invalid
from .generation import ChoiceSpec


def parse_prediction(body: Mapping[str, Any]) -> str | None:
    """The predicted text, or None when the field is absent or null; a 400 for a bad shape."""
    value = body.get("prediction")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(
            f"Invalid type for 'prediction': expected an object, but got {_kind(value)} instead.",
            "prediction",
            "invalid_type",
        )
    if value.get("type") != "content":
        raise invalid(
            f"Invalid value for 'prediction.type': expected 'content', got {value.get('type')!r}.",
            "prediction.type",
            "invalid_value",
        )
    unknown = sorted(set(value) - {"type", "content"})
    if unknown:
        raise invalid(f"Unrecognized parameter: 'prediction.{unknown[0]}'.", "prediction")
    content = value.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        return "".join(_text_part(part, i) for i, part in enumerate(content))
    raise invalid(
        "Invalid 'prediction.content': expected a string or a non-empty array of text parts.",
        "prediction.content",
        "invalid_type",
    )


def _text_part(part: Any, i: int) -> str:
    where = f"prediction.content[{i}]"
    if not isinstance(part, dict) or part.get("type") != "text":
        raise invalid(f"Invalid '{where}': only parts of type 'text' are supported.", where)
    text = part.get("text")
    if not isinstance(text, str):
        raise invalid(f"Invalid '{where}.text': expected a string.", f"{where}.text")
    return text


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def with_prediction(
    specs: Sequence[ChoiceSpec], tokenizer: Any, text: str | None
) -> list[ChoiceSpec]:
    """Every choice verifies the prediction's tokens (no special tokens: it is output text)."""
    if not text:
        return list(specs)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [dataclasses.replace(s, prediction=tuple(ids)) for s in specs]
