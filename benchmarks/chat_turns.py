"""Chat TTFT across turns: does turn 8 cost about what turn 1 did? mlxrun vs mlx-lm, same run.

A conversation of --turns user messages of equal length (--message-tokens tokens of Python
source each) with greedy replies of exactly --reply-tokens tokens (EOS masked on every side, so
all conversations have the same shape). TTFT is the time from handing over the user message
(chat template and tokenization included) to the first reply token.

- mlxrun: ChatSession on its engine, whose prefix cache keeps the conversation's KV between turns.
- mlx-lm: its chat loop's machinery (mlx_lm/chat.py) driven directly: one `make_prompt_cache`
  for the conversation, and each turn only the new message's tokens go to `stream_generate`.
- mlxrun, no cache: ChatSession on an engine with the prefix cache off (the whole history is
  prefilled again each turn), to show what keeping it buys.

The target is TTFT(turn 8) / TTFT(turn 1) <= 1.5. Each figure is the median over --repeats
conversations, run in lockstep (every engine's turn k at about the same moment) so they share
the machine's noise.

Usage: python benchmarks/chat_turns.py [MODEL] [--turns 8] [--message-tokens 64]
       [--reply-tokens 32] [--repeats 3]

MODEL is a model directory (Hub or MLX layout); default: ../shared/models/pycode-16m (relative to
the repository) when it exists. On MLX's CPU backend the weights are cast to float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "pycode-16m"


def _messages(tokenizer, turns: int, n: int) -> list[str]:
    """`turns` user messages of n tokens each: consecutive slices of real Python source."""
    import json

    text = inspect.getsource(json.decoder) + inspect.getsource(argparse)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.decode(ids[i * n : (i + 1) * n]) for i in range(turns)]


def _ours(model, tokenizer, info, reply_tokens: int, keep_cache: bool) -> Callable:
    """A factory of conversations; each is a function: user message -> (TTFT, prompt, prefilled)."""
    from mlxrun.chat import ChatSession
    from mlxrun.engine import Engine
    from mlxrun.generate import engine_config
    from mlxrun.sampling import SamplingParams

    eos = sorted(tokenizer.eos_token_ids)
    params = SamplingParams(
        temperature=0, max_tokens=reply_tokens, logit_bias={e: -100.0 for e in eos},
        ignore_eos=True,
    )  # fmt: skip

    def conversation() -> Callable[[str], tuple[float, int, int]]:
        # An engine per conversation: another conversation's turns must not be cache hits.
        config = engine_config(tokenizer, info.name, info.context_length)
        if not keep_cache:
            config = dataclasses.replace(config, cache_memory_bytes=0)
        engine = Engine(model, config).start()  # a daemon thread: it ends with the process
        chat = ChatSession(
            model, tokenizer, params, context_length=info.context_length, engine=engine
        )

        def turn(text: str) -> tuple[float, int, int]:
            for _ in chat.send(text):
                pass
            t = chat.last_turn
            return t.ttft_s, t.prompt_tokens, t.prefilled_tokens

        return turn

    return conversation


def _mlx_lm(model, tokenizer, reply_tokens: int) -> Callable:
    """mlx_lm.chat's loop: one prompt cache; each turn feeds only the new message's template."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    eos = sorted(tokenizer.eos_token_ids)

    def conversation() -> Callable[[str], tuple[float, int, int]]:
        prompt_cache = make_prompt_cache(model)
        seen = [0]  # tokens the conversation holds

        def turn(text: str) -> tuple[float, int, int]:
            start = time.perf_counter()
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
            if not isinstance(prompt, list):  # a BatchEncoding on some transformers versions
                prompt = list(prompt["input_ids"])
            ttft = None
            for _ in stream_generate(
                model, tokenizer, prompt, max_tokens=reply_tokens,
                sampler=make_sampler(temp=0.0),
                logits_processors=make_logits_processors(logit_bias={e: -100.0 for e in eos}),
                prompt_cache=prompt_cache,
            ):  # fmt: skip
                if ttft is None:
                    ttft = time.perf_counter() - start
            seen[0] += len(prompt) + reply_tokens
            return ttft, seen[0] - reply_tokens, len(prompt)

        return turn

    return conversation


def _lockstep(runs: dict, messages: list[str]) -> dict[str, list[tuple[float, int, int]]]:
    """One conversation per engine, turn by turn, the order rotating each turn, so that every
    engine's turn k runs at about the same moment (this machine's load drifts)."""
    turns = {name: new() for name, new in runs.items()}
    names = list(runs)
    out: dict[str, list] = {name: [] for name in names}
    for i, text in enumerate(messages):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            out[name].append(turns[name](text))
    return out


def _load(path: Path):
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    from mlxrun.loader import load

    model, tokenizer, info = load(str(path), force=True)
    their_model, their_tokenizer = mlx_lm_load(str(path))
    # Float32: bf16 is several times slower on MLX's CPU backend (quantized weights stay as is).
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
        their_model.set_dtype(mx.float32)
    return (model, tokenizer, info), (their_model, their_tokenizer)


def _report(results: dict, turns: int) -> None:
    names = list(results)
    med = {k: [statistics.median(r[i][0] for r in results[k]) for i in range(turns)] for k in names}
    shape = {k: results[k][0] for k in names}
    print(
        f"{'turn':>4} {'prompt':>7} {'prefilled':>9} " + " ".join(f"{k + ' ms':>20}" for k in names)
    )
    for i in range(turns):
        _, prompt, prefilled = shape["mlxrun"][i]
        cells = " ".join(f"{med[k][i] * 1000:>20.1f}" for k in names)
        print(f"{i + 1:>4} {prompt:>7} {prefilled:>9} {cells}")
    print()
    for k in names:
        print(f"{k:>18}: TTFT turn {turns} / turn 1 = {med[k][-1] / med[k][0]:.2f}")
    ratio = med["mlxrun"][-1] / med["mlx-lm"][-1]
    print(f"{'':>18}  TTFT turn {turns}, mlxrun / mlx-lm = {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--message-tokens", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    path = Path(args.model) if args.model else DEFAULT_MODEL
    if not path.exists():
        sys.exit(f"{path} does not exist; pass a model directory")
    import mlx.core as mx

    ours, theirs = _load(path)
    runs = {
        "mlxrun": _ours(*ours, args.reply_tokens, keep_cache=True),
        "mlx-lm": _mlx_lm(*theirs, args.reply_tokens),
        "mlxrun, no cache": _ours(*ours, args.reply_tokens, keep_cache=False),
    }
    messages = _messages(ours[1], args.turns, args.message_tokens)
    _lockstep(runs, messages[:2])  # warm-up: first-use costs must not land on turn 1
    results: dict[str, list] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, turns in _lockstep(runs, messages).items():
            results[name].append(turns)

    info = ours[2]
    print(f"model {path.name} ({info.architecture}, {info.quantization} -> float32 on CPU)"
          if mx.default_device() == mx.cpu else f"model {path.name} ({info.quantization})")  # fmt: skip
    print(f"device {mx.default_device()}, {args.turns} turns, {args.message_tokens}-token "
          f"messages, {args.reply_tokens}-token replies, median of {args.repeats}")  # fmt: skip
    print("prompt / prefilled: mlxrun's tokens per turn (the whole conversation / computed)")
    _report(results, args.turns)


if __name__ == "__main__":
    main()
