"""`mlxrun serve` on a network: no key, no start (unless --no-auth, said at every start); named
keys from a file, re-read on SIGHUP; an unsafe chat template reported at load."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import httpx
import pytest

from mlxrun.server.cli import _is_loopback
from serverutil import CLI, MODEL_ID, start_cli

pytestmark = pytest.mark.server


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_a_lan_host_without_a_key_refuses_to_start(tiny_llama):
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert not _is_loopback(host)
        done = _run(str(tiny_llama), "--host", host, "--port", "0")
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert f"refusing to listen on {host} without an API key" in lines[0]
        for how in ("--api-key", "--api-key-file", "--no-auth"):
            assert how in lines[0]
        assert "Loading" not in done.stderr  # refused before the model was read


def test_no_auth_warns_at_every_start(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for host in ("0.0.0.0", "127.0.0.1"):
        done = _run(missing, "--host", host, "--port", "0", "--no-auth")
        assert f"Warning: --no-auth: anyone who can reach {host} may use this server." in (
            done.stderr
        )
        assert "refusing" not in done.stderr  # it went on (and failed on the missing model)


def test_a_bad_key_file_is_one_line_that_never_shows_a_key(tiny_llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# editors\nalice:secret-one\nsecret-two-without-a-name\n")
    done = _run(str(tiny_llama), "--api-key-file", str(keys), "--port", "0")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"Error: {keys}:3: expected `name:key` (Write one key a line, e.g. `laptop:3f9c…` "
        "(names are shown in logs).)"
    ]
    assert "secret" not in done.stderr


def _status(url: str, key: str) -> int:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    return r.status_code


def test_key_file_is_reloaded_on_sighup_and_unsafe_templates_are_reported(tiny_llama, tmp_path):
    model = tmp_path / MODEL_ID  # served under its directory's name
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ cycler.__init__.__globals__.os.system('true') }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    keys = tmp_path / "keys"
    keys.write_text("alice:key-a-1\nbob:key-b-1\n")
    proc, url = start_cli(model, "--api-key-file", str(keys))
    try:
        assert "keys: alice, bob" in proc.banner  # type: ignore[attr-defined]
        assert "key-a-1" not in proc.banner  # type: ignore[attr-defined]
        assert _status(url, "key-a-1") == 400  # authenticated; the template is refused
        assert _status(url, "key-b-1") == 400
        keys.write_text("alice:key-a-2\ncarol:key-c-1\n")  # alice rotates, bob is revoked
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _status(url, "key-a-1") != 401 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(url, "key-a-1") == 401 and _status(url, "key-b-1") == 401
        assert _status(url, "key-a-2") == 400 and _status(url, "key-c-1") == 400
        keys.write_text("this line is broken\n")  # a bad edit keeps the keys in force
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _status(url, "key-a-2") == 400
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    warning = [line for line in err.splitlines() if "chat template" in line and "unsafe" in line]
    assert warning and str(model / "tokenizer_config.json") in warning[0], err
    assert "keeping the current API keys" in err
    assert " key=alice " in err and " key=carol " in err  # the access log names the key
    assert "key-a-1" not in err and "key-c-1" not in err
    assert proc.returncode == 0
