"""Distributed runs, the parts that need no second process: the per-rank weight share, mode
checks, the memory check and planner counting per-rank bytes, `mlxrun launch`'s host checks.

The two-rank runs themselves (real mlx.launch, ring backend on 127.0.0.1) are in
tests/test_distributed_run.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from mlxrun import distributed, launch, sharding
from mlxrun.distributed import World
from mlxrun.errors import DistributedError, InsufficientMemoryError, UnsupportedModelError

pytestmark = pytest.mark.model


@pytest.fixture(autouse=True)
def _no_world():
    yield
    distributed.set_current(None)  # load(world=...) records it process-wide


def _cfg(path: Path) -> dict:
    from mlxrun import hfconfig, hub

    return hfconfig.normalize(hub.read_config(path))


def test_pipeline_span_matches_mlx_lm_split():
    from mlx_lm.models.pipeline import PipelineMixin

    class FakeGroup:
        def __init__(self, rank, size):
            self._r, self._s = rank, size

        def rank(self):
            return self._r

        def size(self):
            return self._s

    for layers, size in ((8, 2), (7, 3), (5, 4)):
        for rank in range(size):
            m = PipelineMixin()
            m.layers = list(range(layers))
            m.pipeline(FakeGroup(rank, size))
            assert sharding.pipeline_span(layers, rank, size) == (m.start_idx, m.end_idx)


def test_share_bytes_splits_layer_matrices_not_norms_or_embeddings():
    sizes = {
        "model.embed_tokens.weight": 1000,
        "model.norm.weight": 10,
        "lm_head.weight": 1000,
        "model.layers.0.self_attn.q_proj.weight": 400,
        "model.layers.0.input_layernorm.weight": 10,
        "model.layers.1.mlp.down_proj.weight": 800,
        "model.layers.1.post_attention_layernorm.weight": 10,
    }
    assert sharding.share_bytes(sizes, 2, 1, "tensor") == sum(sizes.values())
    assert sharding.share_bytes(sizes, 2, 2, "tensor") == 2010 + 200 + 10 + 400 + 10
    # Pipeline, 2 layers on 2 ranks: rank 0 runs layer 1 (the heavier) plus the shared parts.
    assert sharding.share_bytes(sizes, 2, 2, "pipeline") == 2010 + 810


@pytest.mark.parametrize(
    ("arch", "requested", "expect"),
    [("llama", "auto", "tensor"), ("qwen2", "pipeline", "pipeline"), ("qwen2", "auto", "tensor")],
)
def test_resolve_mode(checkpoint_factory, arch, requested, expect):
    from mlxrun.models import build_model

    model = build_model(_cfg(checkpoint_factory(arch)))
    assert sharding.resolve_mode(model, requested, arch) == expect


def test_unsupported_architecture_is_named(checkpoint_factory):
    from mlxrun.models import build_model

    llama = build_model(_cfg(checkpoint_factory("llama")))
    with pytest.raises(UnsupportedModelError, match="'llama'.*pipeline.*only tensor"):
        sharding.resolve_mode(llama, "pipeline", "llama")
    mixtral = build_model(_cfg(checkpoint_factory("mixtral")))
    with pytest.raises(UnsupportedModelError, match="'mixtral'.*neither"):
        sharding.resolve_mode(mixtral, "auto", "mixtral")


def test_tensor_parallel_needs_divisible_heads():
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads \\(2\\) divisible by 4"):
        sharding.check_divisible(
            {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}, 4
        )


def test_parallel_without_a_launch_is_refused(monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    assert distributed.init_world(None) is None
    with pytest.raises(DistributedError, match="not started by mlx.launch"):
        distributed.init_world("tensor")


def test_load_time_memory_check_counts_the_rank_share(checkpoint_factory, monkeypatch):
    from mlxrun import loader, memory

    path = checkpoint_factory("llama", num_layers=4, hidden_size=256, intermediate_size=512)
    cfg = _cfg(path)
    context = 64
    whole = memory.footprint(sum(sharding.tensor_sizes(path).values()), cfg, context, 4)
    share = sharding.share_bytes(sharding.tensor_sizes(path), 4, 2, "tensor")
    per_rank = memory.footprint(share, cfg, context, 4, ranks=2)
    assert per_rank < whole
    monkeypatch.setenv("MLXRUN_MEMORY_BUDGET", str((whole + per_rank) // 2))
    with pytest.raises(InsufficientMemoryError):
        loader.load(path, context=context)
    # A 2-rank world: the same check passes on the per-rank share. (Loading then runs shard()
    # over the real single-process group, so the model comes back whole and usable.)
    world = World(rank=0, size=2, backend="ring", parallel="tensor")
    model, _, _ = loader.load(path, context=context, world=world)
    assert distributed.current().parallel == "tensor"
    with pytest.raises(InsufficientMemoryError):
        monkeypatch.setenv("MLXRUN_MEMORY_BUDGET", str(per_rank - 1))
        loader.load(path, context=context, world=world)


def test_convert_plan_with_hosts_counts_per_rank_share(checkpoint_factory):
    from mlxrun.convert.plan import estimate
    from mlxrun.models import build_model

    cfg = _cfg(checkpoint_factory("llama", num_layers=4, hidden_size=256, intermediate_size=512))
    one = estimate(build_model(cfg), cfg, None, 256, budget_bytes=10**9)
    two = estimate(build_model(cfg), cfg, None, 256, budget_bytes=10**9, hosts=2)
    rows = {r.name: r.nbytes for r in one.components}
    split = rows["attention"] + rows["mlp"]
    assert two.weights_bytes == one.weights_bytes - split // 2
    assert two.kv_bytes == one.kv_bytes // 2
    assert two.total_bytes < one.total_bytes


def test_convert_fit_hosts_cli_counts_per_rank_share(checkpoint_factory):
    from click.testing import CliRunner

    from mlxrun.cli import main
    from mlxrun.convert.plan import choose_plan
    from mlxrun.models import build_model

    path = checkpoint_factory("llama", num_layers=4, hidden_size=256, intermediate_size=512)
    cfg = _cfg(path)
    # A budget only the per-rank share of the smallest recipe fits.
    with pytest.raises(InsufficientMemoryError) as e:
        choose_plan(build_model(cfg), cfg, 1, 256)
    needed_one = e.value.needed
    with pytest.raises(InsufficientMemoryError) as e:
        choose_plan(build_model(cfg), cfg, 1, 256, hosts=2)
    budget = (needed_one + e.value.needed) // 2
    base = ["convert", str(path), "--plan", "--context", "256", "--fit", str(budget)]
    one = CliRunner().invoke(main, base)
    two = CliRunner().invoke(main, [*base, "--hosts", "2"])
    assert one.exit_code != 0 and "no recipe fits" in one.output
    assert two.exit_code == 0, two.output
    assert "per rank, 2 hosts" in two.output


def test_check_hosts_names_the_host_that_differs(tiny_llama):
    prints = {"mac1": "aaa", "mac2": "bbb", "mac3": "aaa"}
    asked = []

    def fake(host, path):
        asked.append(host)
        return prints.get(host)

    assert launch.check_hosts(["mac1", "mac3", "mac1"], tiny_llama, fake) == "aaa"
    assert asked == ["mac1", "mac3"]  # each host once
    with pytest.raises(DistributedError, match="host mac2 holds a different model") as e:
        launch.check_hosts(["mac1", "mac2"], tiny_llama, fake)
    assert "bbb vs aaa" in e.value.message
    with pytest.raises(DistributedError, match="host mac4 has no model"):
        launch.check_hosts(["mac1", "mac4"], tiny_llama, fake)


def test_local_hosts_are_checked_for_real(tiny_llama, tmp_path):
    copy = shutil.copytree(tiny_llama, tmp_path / "m")
    assert launch.check_hosts(["127.0.0.1", "localhost"], copy) == launch.local_check("x", copy)
    with pytest.raises(DistributedError, match="host 127.0.0.1 \\(rank 0\\) has no model"):
        launch.check_hosts(["127.0.0.1"], tmp_path / "absent")
    # The fingerprint sees the weights, not just the names.
    before = launch.local_check("127.0.0.1", copy)
    weights = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert launch.local_check("127.0.0.1", copy) != before


def test_ssh_host_check_reports_unreachable_hosts(tiny_llama, monkeypatch, tmp_path):
    # An `ssh` that fails as a real one does for an unknown host (exit 255).
    fake = tmp_path / "ssh"
    fake.write_text("#!/bin/sh\necho 'ssh: Could not resolve hostname mac9' >&2\nexit 255\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    with pytest.raises(DistributedError, match="cannot check the model on host mac9"):
        launch.check_hosts(["127.0.0.1", "mac9"], tiny_llama)


def test_launch_builds_the_mlx_launch_call(tiny_llama):
    argv = launch.build_argv(
        ["serve", "tiny", "--port", "8080"], tiny_llama, hosts="10.0.0.1,10.0.0.2"
    )
    sep = argv.index("--")
    assert argv[sep - 2 : sep] == ["--hosts", "10.0.0.1,10.0.0.2"]
    assert argv[sep + 1 :] == [
        sys.executable, "-m", "mlxrun", "serve", str(tiny_llama), "--port", "8080"
    ]  # fmt: skip
    with_file = launch.build_argv(["generate", "m"], tiny_llama, hostfile="h.json", backend="jaccl")
    sep = with_file.index("--")
    assert with_file[sep - 4 : sep] == ["--hostfile", "h.json", "--backend", "jaccl"]
    with pytest.raises(Exception, match="serve MODEL"):
        launch.split_command(["chat", "m"])


def test_launch_cli_dry_run_prints_the_call(tiny_llama):
    from click.testing import CliRunner

    from mlxrun.cli import main

    res = CliRunner().invoke(
        main, ["launch", "--hosts", "127.0.0.1", "-n", "2", "--dry-run", "serve", str(tiny_llama),
               "--port", "9000"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "matches on every host" in res.stderr
    assert f"mlxrun serve {tiny_llama} --port 9000" in res.stdout
    assert "--hosts 127.0.0.1 -n 2 --" in res.stdout


def test_alone_the_broadcasts_are_identities():
    import mlx.core as mx

    assert distributed.current() is None
    x = mx.array([3, 1, 2])
    assert distributed.broadcast(x) is x
    assert distributed.shared_sampler(len) is len
    assert distributed.broadcast_ints([4, 5]) == [4, 5]
    assert distributed.broadcast_bytes(b"abc") == b"abc"


def test_mirrored_requests_travel_without_their_grammar():
    from mlxrun.engine import EngineConfig, Request
    from mlxrun.engine_mirror import MirroredEngine, _Submit, mirrored_config

    cfg = mirrored_config(EngineConfig(cache_dir="/tmp/x", max_pinned_prefixes=8))
    assert cfg.cache_dir is None and cfg.max_pinned_prefixes == 0
    sent = MirroredEngine._wire(_Submit(Request("r", [1, 2], constraint=object()), sink=object()))
    assert sent.request.constraint is None and sent.sink is None
    assert sent.request.prompt_token_ids == [1, 2]


def test_mirrored_serve_refuses_pipeline_parallel():
    from mlxrun.engine import EngineConfig
    from mlxrun.engine_mirror import MirroredEngine

    world = World(rank=0, size=2, backend="ring", parallel="pipeline")
    with pytest.raises(UnsupportedModelError, match="in tensor parallel only"):
        MirroredEngine(object(), EngineConfig(), world)
