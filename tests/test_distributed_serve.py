"""`mlxrun serve` over two real ranks (mlx.launch, ring backend on 127.0.0.1, CPU), driven by
the official openai client: rank 0 serves HTTP, rank 1 mirrors every engine step.

Marked slow: each test launches two processes that import MLX and load the model.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_distributed_run import free_port_pair

from serverutil import make_app, serve_in_thread, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.server]

MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`mlxrun launch -n 2 ... serve MODEL` in a subprocess, logs in files."""

    def __init__(self, model: Path, tmp: Path, *serve_args: str):
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp / "launch.err"
        argv = [sys.executable, "-m", "mlxrun", "launch", "--hosts", "127.0.0.1", "-n", "2",
                "--starting-port", str(free_port_pair()), "serve", str(model), "--port",
                str(self.port), "--context", "512", *serve_args]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=open(tmp / "launch.out", "w"),  # noqa: SIM115 - closed with the process
            stderr=open(self.err_path, "w"),  # noqa: SIM115
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            wait_healthy(self.base_url, timeout=240, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def rank_pid(self, rank: int) -> int:
        """The pid of the serve process with MLX_RANK=rank on our port."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(self.port).encode() in cmd and f"MLX_RANK={rank}".encode() in env:
                return int(pid)
        raise LookupError(f"no rank {rank} process")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> int:
        """SIGTERM to mlxrun launch, which stops mlx.launch and every rank with it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.assert_no_ranks_left()

    def assert_no_ranks_left(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.rank_pid(0)
            except LookupError:
                try:
                    self.rank_pid(1)
                except LookupError:
                    return
            time.sleep(0.5)
        raise AssertionError("a rank outlived mlxrun launch")


@pytest.fixture
def served(tiny_llama, tmp_path):
    launch = Launch(tiny_llama, tmp_path, "--max-running", "8", "--alias", "tiny")
    yield launch
    launch.stop()


def _chat(client: openai.OpenAI, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=24, **kw
    )


def test_served_chat_matches_one_process_and_streams_concurrently(served, tiny_llama):
    with serve_in_thread(make_app(tiny_llama, model_id="tiny")) as one_url:
        alone = _chat(openai.OpenAI(base_url=one_url + "/v1", api_key="x"))
    want = alone.choices[0].message.content
    assert want

    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="x")
    first = _chat(client)
    assert first.choices[0].message.content == want
    assert "distributed: 2 ranks, tensor parallel (ring)" in served.stderr
    # Same chat again: rank 0 and rank 1 both hit their prefix cache (shard of the KV).
    again = _chat(client)
    assert again.choices[0].message.content == want
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    # A stop string cuts the text where it starts (the output stage on rank 0 aborts the
    # request; the abort is mirrored on rank 1, which must stay in step for what follows).
    cut = want[len(want) // 2 :][:4]
    stopped = _chat(client, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == want[: want.index(cut)]

    async def one_stream(i: int, aclient: openai.AsyncOpenAI) -> tuple[str, str]:
        stream = await aclient.chat.completions.create(
            model="tiny", stream=True, temperature=0, max_tokens=16 + i,
            messages=[{"role": "user", "content": f"Request {i}: count to ten."}],
        )  # fmt: skip
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def eight() -> list:
        aclient = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key="x")
        return await asyncio.gather(*(one_stream(i, aclient) for i in range(8)))

    results = asyncio.run(eight())
    assert len(results) == 8
    assert all(finish in ("stop", "length") for _, finish in results)
    assert sum(bool(text) for text, _ in results) >= 7

    # A stream the client drops mid-way is aborted on every rank; the next request still works.
    with httpx.stream("POST", served.base_url + "/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 200,
        "temperature": 0,
    }, timeout=60) as r:  # fmt: skip
        next(r.iter_lines())
    assert _chat(client).choices[0].message.content == want


def test_a_dead_rank_gets_a_503_not_a_hang(tiny_llama, tmp_path):
    launch = Launch(tiny_llama, tmp_path, "--step-timeout", "30", "--alias", "tiny")
    try:
        client = openai.OpenAI(base_url=launch.base_url + "/v1", api_key="x", max_retries=0)
        assert _chat(client).choices[0].message.content  # warm: both ranks answer
        outcome: dict = {}

        def long_request() -> None:
            try:
                client.completions.create(
                    model="tiny", prompt="def add(a, b):", max_tokens=400, temperature=0,
                    extra_body={"ignore_eos": True}, timeout=90,
                )  # fmt: skip
                outcome["ok"] = True
            except openai.APIStatusError as e:
                outcome["status"], outcome["body"] = e.status_code, e.response.text
            except openai.APIConnectionError as e:
                outcome["dropped"] = repr(e)

        import threading

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(2.0)  # mid-request
        start = time.monotonic()
        os.kill(launch.rank_pid(1), 9)
        t.join(timeout=60)
        assert not t.is_alive(), "the request hung"
        assert outcome.get("status") == 503, outcome
        assert "rank 1" in outcome["body"]
        assert time.monotonic() - start < 30  # well before the step timeout
        # mlx.launch stops rank 0 once rank 1 is gone; mlxrun launch then exits non-zero.
        assert launch.proc.wait(timeout=60) != 0
        assert "distributed run failed: rank 1" in launch.stderr
    finally:
        if launch.proc.poll() is None:
            os.killpg(launch.proc.pid, 9)


def test_pipeline_parallel_serve_is_refused_clearly(checkpoint_factory, tmp_path):
    model = checkpoint_factory("qwen2")
    argv = [sys.executable, "-m", "mlxrun", "launch", "--hosts", "127.0.0.1", "-n", "2",
            "--starting-port", str(free_port_pair()), "serve", str(model), "--port",
            str(_free_port()), "--parallel", "pipeline"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "runs across machines in tensor parallel only" in done.stderr
