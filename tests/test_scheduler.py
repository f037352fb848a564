"""Pure tier: scheduler decisions step by step, and invariants under random workloads. No MLX."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mlxrun.errors import EngineOverloadedError, InvalidRequestError
from mlxrun.scheduler import Scheduler, SchedulerConfig, SeqState, StepPlan

pytestmark = pytest.mark.pure


def seq(rid: str, prompt: int = 4, max_tokens: int = 16, **kw) -> SeqState:
    return SeqState(rid, num_prompt_tokens=prompt, max_tokens=max_tokens, **kw)


def step(s: Scheduler, finished: tuple[str, ...] = ()) -> StepPlan:
    """One engine step: schedule, compute everything planned, report back."""
    plan = s.schedule()
    computed = {rid: 1 for rid in plan.decode} | dict(plan.prefill)
    s.complete_step(computed, list(finished))
    return plan


def test_scheduler_does_not_import_mlx():
    code = "import sys, mlxrun.scheduler; assert 'mlx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decodes_first_then_budget_split_over_prefills():
    s = Scheduler(SchedulerConfig(max_running=8, max_tokens_per_step=8))
    for rid in "abc":
        s.add(seq(rid, prompt=2))
    plan = step(s)
    assert plan.admitted == ["a", "b", "c"] and plan.decode == []
    assert plan.prefill == [("a", 2), ("b", 2), ("c", 2)]
    s.add(seq("long", prompt=20))
    plan = step(s)
    assert plan.decode == ["a", "b", "c"]
    assert plan.prefill == [("long", 5)]  # 8 - 3 decodes
    assert plan.num_tokens == 8
    assert s.get("long").num_computed_tokens == 5


def test_4000_token_prompt_is_chunked_while_decoders_keep_going():
    s = Scheduler(SchedulerConfig(max_running=8, max_tokens_per_step=512))
    for rid in ("d1", "d2", "d3"):
        s.add(seq(rid, prompt=10, max_tokens=100))
    step(s)  # the three prompts fit in one step
    s.add(seq("big", prompt=4000, max_tokens=10))
    chunks = []
    while s.get("big").is_prefilling:
        before = {rid: s.get(rid).num_tokens for rid in ("d1", "d2", "d3")}
        plan = step(s)
        assert plan.decode == ["d1", "d2", "d3"]  # every decoder, every step
        assert plan.num_tokens <= 512
        chunks += [n for rid, n in plan.prefill if rid == "big"]
        for rid, n in before.items():
            assert s.get(rid).num_tokens == n + 1
    assert chunks == [509] * 7 + [4000 - 509 * 7]
    big = s.get("big")
    assert big.num_computed_tokens == 4000 and big.num_tokens == 4001  # first token sampled
    assert step(s).decode == ["d1", "d2", "d3", "big"]


def test_prefix_cache_hit_only_prefills_the_rest():
    s = Scheduler()
    s.add(seq("a", prompt=100, num_computed_tokens=90))
    assert s.schedule().prefill == [("a", 10)]
    with pytest.raises(ValueError):
        s.add(seq("b", prompt=100, num_computed_tokens=100))  # nothing left to get logits from


def test_priority_orders_admission():
    s = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=64))
    s.add(seq("low1"))
    s.add(seq("high", priority=1))
    s.add(seq("low2"))
    assert s.schedule().admitted == ["high"]
    s.complete_step({}, ["high"])
    assert s.schedule().admitted == ["low1"]
    s.complete_step({}, ["low1"])
    assert s.schedule().admitted == ["low2"]


def test_priority_orders_prefill_then_arrival():
    s = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=16))
    s.add(seq("long", prompt=1000))
    step(s)
    s.add(seq("late-low", prompt=8))
    s.add(seq("interactive", prompt=12, priority=1))
    plan = s.schedule()
    assert plan.prefill == [("interactive", 12), ("long", 4)]
    s.complete_step(dict(plan.prefill), [])
    plan = s.schedule()
    assert plan.decode == ["interactive"]
    assert plan.prefill == [("long", 15)]  # arrival order among equals: long before late-low


def test_max_running_caps_the_batch():
    s = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=64))
    for i in range(5):
        s.add(seq(f"r{i}"))
    assert s.schedule().admitted == ["r0", "r1"]
    assert (s.num_running, s.num_waiting) == (2, 3)
    s.complete_step({"r0": 4, "r1": 4}, ["r0"])
    assert s.schedule().admitted == ["r2"]
    assert s.num_running == 2


def test_kv_capacity_admission_and_waiting():
    s = Scheduler(SchedulerConfig(max_tokens_per_step=64, kv_capacity_tokens=100))
    s.add(seq("a", prompt=40, max_tokens=20))  # reserves 60
    s.add(seq("b", prompt=30, max_tokens=20))  # 50: does not fit beside a
    s.add(seq("c", prompt=5, max_tokens=5))  # would fit, but waits behind b (no starvation)
    assert s.schedule().admitted == ["a"]
    assert s.stats()["kv_tokens_reserved"] == 60
    assert s.get("b").status == "waiting"
    s.complete_step({"a": 40}, ["a"])
    assert s.schedule().admitted == ["b", "c"]
    assert s.stats()["kv_tokens_reserved"] == 60


def test_request_larger_than_kv_capacity_is_rejected():
    s = Scheduler(SchedulerConfig(kv_capacity_tokens=100))
    with pytest.raises(InvalidRequestError) as e:
        s.add(seq("a", prompt=50, max_tokens=51))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        s.add(seq("b", prompt=100, max_tokens=1))
    assert e.value.param == "prompt"
    assert s.num_waiting == 0 and s.stats()["rejected"] == 2


def test_overload_at_max_waiting():
    s = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=8, max_waiting=2))
    for rid in "abc":  # one for the free running slot, two queued
        s.add(seq(rid))
    with pytest.raises(EngineOverloadedError) as e:
        s.add(seq("d"))
    assert e.value.retry_after > 0
    s.schedule()  # a runs; b and c fill the queue
    with pytest.raises(EngineOverloadedError):
        s.add(seq("d"))
    s.abort("b")
    s.add(seq("d"))
    assert s.get("d").status == "waiting" and s.stats()["rejected"] == 2


def test_abort_from_waiting_and_running():
    s = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=8, kv_capacity_tokens=100))
    s.add(seq("run", prompt=10))
    s.add(seq("wait", prompt=10))
    plan = s.schedule()
    assert plan.admitted == ["run"]
    st_wait = s.abort("wait")
    assert st_wait.request_id == "wait" and st_wait.status == "finished"
    st_run = s.abort("run")  # between schedule and complete_step
    assert st_run.status == "finished"
    s.complete_step(dict(plan.prefill), [])  # the aborted id is ignored
    assert s.get("run") is None and s.get("wait") is None
    assert s.abort("run") is None and s.abort("nope") is None
    assert s.stats()["kv_tokens_reserved"] == 0 and s.stats()["aborted"] == 2
    assert s.schedule() == StepPlan(decode=[], prefill=[], admitted=[])


def test_group_cancellation_returns_older_ids_of_the_same_group_only():
    s = Scheduler()
    assert s.add(seq("k1", group="editor")) == []
    assert s.add(seq("x", group="other")) == []
    assert s.add(seq("plain")) == []
    s.schedule()  # k1 now running
    assert s.add(seq("k2", group="editor")) == ["k1"]
    assert s.add(seq("k3", group="editor")) == ["k1", "k2"]  # the engine had not aborted yet
    for rid in ("k1", "k2"):
        s.abort(rid)
    assert s.add(seq("k4", group="editor")) == ["k3"]
    assert s.add(seq("none")) == []


def test_group_cancellation_frees_room_in_a_full_queue():
    s = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=8, max_waiting=1))
    s.add(seq("busy"))
    s.schedule()
    s.add(seq("k1", group="ed"))
    with pytest.raises(EngineOverloadedError):
        s.add(seq("other"))
    assert s.add(seq("k2", group="ed")) == ["k1"]  # replaces k1 rather than being refused


def test_complete_step_bookkeeping():
    s = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=6))
    s.add(seq("a", prompt=10, max_tokens=3))
    plan = s.schedule()
    assert plan.prefill == [("a", 6)]
    s.complete_step({"a": 6}, [])
    a = s.get("a")
    assert (a.num_computed_tokens, a.num_tokens, a.status) == (6, 10, "running")
    with pytest.raises(ValueError):
        s.complete_step({"a": 5}, [])  # only 4 prompt tokens remain
    s.complete_step({"a": 4}, [])
    assert (a.num_computed_tokens, a.num_tokens, a.num_generated) == (10, 11, 1)
    assert not a.is_prefilling
    with pytest.raises(ValueError):
        s.complete_step({"a": 2}, [])  # a decode computes exactly one token
    s.complete_step({"a": 1}, [])
    assert (a.num_computed_tokens, a.num_tokens) == (11, 12)
    s.complete_step({"a": 1}, ["a", "unknown"])
    assert a.status == "finished" and s.get("a") is None
    assert s.stats()["finished"] == 1 and s.stats()["kv_tokens_reserved"] == 0


def test_stats_and_counts():
    s = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=4, kv_capacity_tokens=64))
    s.add(seq("a", prompt=8))
    s.add(seq("b"))
    s.schedule()
    st_ = s.stats()
    assert st_["running"] == 1 and st_["waiting"] == 1 and st_["prefilling"] == 1
    assert st_["kv_tokens_reserved"] == 24 and st_["kv_capacity_tokens"] == 64
    assert st_["added"] == 2 and s.num_running == 1 and s.num_waiting == 1 and s.has_work


def test_invalid_config_and_requests():
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_running=8, max_tokens_per_step=4)  # decodes could not all fit
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_running=0)
    s = Scheduler()
    s.add(seq("a"))
    with pytest.raises(InvalidRequestError):
        s.add(seq("a"))
    with pytest.raises(InvalidRequestError):
        s.add(seq("b", prompt=0))
    with pytest.raises(InvalidRequestError):
        s.add(seq("c", max_tokens=0))


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / abort / step sequences, with an engine that finishes at max_tokens."""

    def __init__(self):
        super().__init__()
        self.cfg = SchedulerConfig(
            max_running=4, max_tokens_per_step=8, max_waiting=4, kv_capacity_tokens=80
        )
        self.s = Scheduler(self.cfg)
        self.added: set[str] = set()
        self.gone: set[str] = set()
        self.n = 0

    @rule(
        prompt=st.one_of(st.integers(1, 3), st.integers(1, 40)),
        max_tokens=st.integers(1, 12),
        priority=st.integers(0, 1),
        group=st.sampled_from([None, "g1", "g2"]),
    )
    def add(self, prompt, max_tokens, priority, group):
        rid = f"r{self.n}"
        self.n += 1
        try:
            older = self.s.add(seq(rid, prompt, max_tokens, priority=priority, group=group))
        except (EngineOverloadedError, InvalidRequestError):
            assert self.s.get(rid) is None
            return
        self.added.add(rid)
        assert rid not in older and all(self.s.get(o).group == group for o in older)
        assert all(int(o[1:]) < int(rid[1:]) for o in older)  # only older ones
        for o in older:  # the engine aborts them
            assert self.s.abort(o) is not None
            self.gone.add(o)

    @rule(data=st.data())
    def abort(self, data):
        live = sorted(self.added - self.gone)
        if live:
            rid = data.draw(st.sampled_from(live))
            assert self.s.abort(rid) is not None
            self.gone.add(rid)

    @rule(abort_mid_step=st.booleans())
    def step(self, abort_mid_step):
        live_before = self.added - self.gone
        plan = self.s.schedule()
        assert plan.num_tokens <= self.cfg.max_tokens_per_step
        ids = plan.decode + [rid for rid, _ in plan.prefill]
        assert len(ids) == len(set(ids)) and all(n >= 1 for _, n in plan.prefill)
        decoders = {
            rid for rid in self.added - self.gone
            if (q := self.s.get(rid)) and q.status == "running" and not q.is_prefilling
        }  # fmt: skip
        assert set(plan.decode) == decoders  # every running decoder, every step
        assert set(plan.admitted) <= live_before
        if abort_mid_step and ids:
            self.s.abort(ids[0])
            self.gone.add(ids[0])
        computed = {rid: 1 for rid in plan.decode} | dict(plan.prefill)
        self.s.complete_step(computed, [])
        done = [
            rid for rid in computed
            if (q := self.s.get(rid)) and q.num_generated >= q.max_tokens
        ]  # fmt: skip
        self.s.complete_step({}, done)
        self.gone.update(done)

    @invariant()
    def nothing_lost(self):
        for rid in self.added:
            assert (self.s.get(rid) is None) == (rid in self.gone)
        st_ = self.s.stats()
        live = [q for rid in self.added - self.gone if (q := self.s.get(rid))]
        assert st_["running"] + st_["waiting"] == len(live)
        running = [q for q in live if q.status == "running"]
        assert st_["kv_tokens_reserved"] == sum(q.kv_tokens_reserved for q in running)
        assert st_["running"] <= self.cfg.max_running
        assert st_["kv_tokens_reserved"] <= self.cfg.kv_capacity_tokens
        assert st_["waiting"] <= self.cfg.max_waiting + self.cfg.max_running


SchedulerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_drains_completely(seed):
    """Every accepted request finishes within a bounded number of steps: nothing starves."""
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_running=4, max_tokens_per_step=32, max_waiting=50,
                          kv_capacity_tokens=400)  # fmt: skip
    s = Scheduler(cfg)
    accepted, finished = set(), set()
    for i in range(40):
        rid = f"r{i}"
        s.add(seq(rid, rng.randint(1, 200), rng.randint(1, 30), priority=rng.randint(0, 1)))
        accepted.add(rid)
        if rng.random() < 0.5:
            finished |= _checked_step(s, accepted - finished)
    for _ in range(2000):
        if not s.has_work:
            break
        finished |= _checked_step(s, accepted - finished)
    assert not s.has_work and finished == accepted


def _checked_step(s: Scheduler, live: set[str]) -> set[str]:
    """Step, check the plan, then finish what reached max_tokens (as the engine would)."""
    plan = s.schedule()
    assert plan.num_tokens <= s.config.max_tokens_per_step
    running = [q for rid in live if (q := s.get(rid)) and q.status == "running"]
    assert sorted(plan.decode) == sorted(q.request_id for q in running if not q.is_prefilling)
    s.complete_step({rid: 1 for rid in plan.decode} | dict(plan.prefill), [])
    ids = plan.decode + [rid for rid, _ in plan.prefill]
    done = [rid for rid in ids if (q := s.get(rid)) and q.num_generated >= q.max_tokens]
    s.complete_step({}, done)
    return set(done)
