"""Talk to `mlxrun serve` with the official OpenAI Python client.

    mlxrun serve qwen2.5-coder-1.5b            # in one terminal
    python examples/openai_client.py           # in another

Options: --base-url (default http://127.0.0.1:8080/v1), --model (default: the first one the server
lists), --api-key (default: $MLXRUN_API_KEY, else a placeholder: the client insists on one).
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default=None)
    parser.add_argument("--api-key", default=os.environ.get("MLXRUN_API_KEY", "not-needed"))
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    card = (
        client.models.list().data[0] if args.model is None else client.models.retrieve(args.model)
    )
    model = card.id
    extra = card.model_extra or {}
    print(f"model: {model}  context: {extra.get('context_length')}  "
          f"capabilities: {extra.get('capabilities')}\n")  # fmt: skip

    # 1. A chat completion, all at once.
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a concise Python expert."},
            {"role": "user", "content": "Write a function that checks if a number is prime."},
        ],
        max_tokens=args.max_tokens,
        temperature=0.2,
    )
    print("== chat ==")
    print(reply.choices[0].message.content)
    usage = reply.usage
    print(f"[{usage.prompt_tokens} prompt tokens ({usage.prompt_tokens_details.cached_tokens} "
          f"cached), {usage.completion_tokens} generated, finish: {reply.choices[0].finish_reason}]\n")  # fmt: skip

    # 2. The same, streamed token by token, with usage in a final chunk.
    print("== streamed chat ==")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Explain Python's GIL in two sentences."}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\n[{chunk.usage.completion_tokens} tokens]\n")

    # 3. A plain completion with a stop string (generation stops there; finish_reason "stop").
    print("== completion ==")
    done = client.completions.create(
        model=model,
        prompt="def fibonacci(n):\n",
        max_tokens=args.max_tokens,
        temperature=0,
        stop=["\ndef ", "\nclass "],
    )
    print(done.choices[0].text)
    print(f"[finish: {done.choices[0].finish_reason}]\n")

    # 4. Fill in the middle, on models with FIM tokens (Qwen2.5-Coder, StarCoder2, CodeLlama…).
    if extra.get("capabilities", {}).get("fim"):
        print("== fill in the middle ==")
        fim = client.completions.create(
            model=model,
            prompt="def average(xs):\n    ",
            suffix="\n    return total / len(xs)\n",
            max_tokens=args.max_tokens,
            temperature=0,
        )
        print(fim.choices[0].text)


if __name__ == "__main__":
    main()
