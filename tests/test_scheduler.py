"""The scheduler without a model.

A fake model runner stands in for the real one: it keeps a paged store shaped like the KV
cache (one slot per position, addressed through each request's block table), writes the
"KV" of every scheduled token into it, then "attends" by reading back every position of
each request that samples. So a wrong block table, a prefix-cache hit on other content,
or a position lost to preemption fails here as it would corrupt a real model's output.
The sampled token is a deterministic function of the sequence, so each output can be
checked token by token.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Optional

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams

BLOCK_SIZE = 4
VOCAB = 97
FILLER = 7  # a token that stops nothing


def next_token(tokens: list[int]) -> int:
    """The fake model: the next token depends on every token before it."""
    h = 0
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def make_scheduler(
    num_blocks: int,
    block_size: int = BLOCK_SIZE,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    enable_caching: bool = True,
    enable_chunked_prefill: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_caching))


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 8,
    block_size: int = BLOCK_SIZE,
    eos_token_ids: frozenset[int] = frozenset(),
    **params,
) -> Request:
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)
    sampling_params.all_stop_token_ids |= set(eos_token_ids)  # what the engine adds
    return Request(request_id, list(prompt), sampling_params, max_tokens, block_size)


class FakePagedRunner:
    """Writes each scheduled token's "KV" through the block table; sampling reads it all back.

    A real KV entry depends on its token, its position and every token before it, so the
    fake one is the whole prefix up to and including its position: a block reused under
    the wrong prefix, or a position never computed, reads back wrong.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[Optional[tuple[int, ...]]]] = [[None] * block_size for _ in range(num_blocks)]
        self.prompt_logprobs_next_pos: dict[str, int] = {}

    def execute(self, out: SchedulerOutput, sample: Callable[[list[int]], int] = next_token) -> ModelRunnerOutput:
        bs = self.block_size
        # Every request's new KV is written before anyone reads (as each layer does).
        for s in out.scheduled:
            assert s.token_ids, f"{s.request_id}: scheduled with no token to compute"
            seq = s.prompt_token_ids + s.output_token_ids
            end = s.num_computed_tokens + len(s.token_ids)
            assert s.token_ids == seq[s.num_computed_tokens : end]
            assert len(s.block_ids) * bs >= end, f"{s.request_id}: block table too short"
            self._check_prompt_logprobs_chunk(s, end)
            for pos in range(s.num_computed_tokens, end):
                self.slots[s.block_ids[pos // bs]][pos % bs] = tuple(seq[: pos + 1])
        sampled = {}
        for s in out.scheduled:
            if not s.sample:
                continue
            seq = s.prompt_token_ids + s.output_token_ids
            end = s.num_computed_tokens + len(s.token_ids)
            for pos in range(end):
                kv = self.slots[s.block_ids[pos // bs]][pos % bs]
                assert kv == tuple(seq[: pos + 1]), f"{s.request_id}: wrong KV at position {pos}: {kv}"
            sampled[s.request_id] = sample(seq)
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def _check_prompt_logprobs_chunk(self, s: ScheduledRequest, end: int) -> None:
        """Prompt logprobs need every prompt position run, in order, from position 0."""
        if s.sampling_params.prompt_logprobs is None or s.output_token_ids:
            return
        next_pos = self.prompt_logprobs_next_pos.get(s.request_id, 0)
        assert s.num_computed_tokens in (0, next_pos), f"{s.request_id}: prompt positions skipped"
        assert s.compute_prompt_logprobs == (s.num_computed_tokens < len(s.prompt_token_ids) - 1)
        self.prompt_logprobs_next_pos[s.request_id] = end


def step(scheduler: Scheduler, sample: Callable[[list[int]], int] = lambda _: FILLER) -> SchedulerOutput:
    """One step with a runner that returns `sample(...)` for every request that samples."""
    out = scheduler.schedule()
    sampled = {
        s.request_id: sample(s.prompt_token_ids + s.output_token_ids) for s in out.scheduled if s.sample
    }
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out


def tokens_by_request(out: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: len(s.token_ids) for s in out.scheduled}


def all_free(scheduler: Scheduler) -> bool:
    pool = scheduler.kv_cache_manager.block_pool
    return pool.num_free_blocks == pool.num_blocks and all(b.ref_cnt == 0 for b in pool.blocks)


# ----- budget, chunking, order ------------------------------------------------------------


def test_empty_scheduler_schedules_nothing():
    scheduler = make_scheduler(num_blocks=4)
    out = scheduler.schedule()
    assert out.is_empty and out.num_batched_tokens == 0
    assert not scheduler.has_unfinished_requests()


def test_token_budget_respected_every_step():
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=10)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", [i] * (7 + 3 * i), max_tokens=4))
    for _ in range(100):
        if not scheduler.has_unfinished_requests():
            break
        out = step(scheduler)
        total = sum(len(s.token_ids) for s in out.scheduled)
        assert 0 < total <= 10
        assert out.num_batched_tokens == total
    assert not scheduler.has_unfinished_requests()


def test_chunked_prefill_samples_only_on_last_chunk():
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=10)
    prompt = list(range(25))
    request = make_request("long", prompt, max_tokens=2)
    scheduler.add_request(request)
    chunks = []
    for _ in range(3):
        (s,) = step(scheduler).scheduled
        chunks.append((s.num_computed_tokens, len(s.token_ids), s.sample))
    assert chunks == [(0, 10, False), (10, 10, False), (20, 5, True)]
    assert request.output_token_ids == [FILLER]
    assert request.num_computed_tokens == 25
    (s,) = step(scheduler).scheduled  # then one decode
    assert (s.num_computed_tokens, s.token_ids, s.sample) == (25, [FILLER], True)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_chunked_prefill_fills_leftover_budget_with_a_new_prompt():
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", range(4), max_tokens=4))
    step(scheduler)
    scheduler.add_request(make_request("b", range(10, 20), max_tokens=4))
    out = step(scheduler)
    assert tokens_by_request(out) == {"a": 1, "b": 7}


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    scheduler = make_scheduler(
        num_blocks=16, max_num_batched_tokens=12, max_model_len=12, enable_chunked_prefill=False
    )
    scheduler.add_request(make_request("a", range(4), max_tokens=3))
    step(scheduler)
    scheduler.add_request(make_request("b", range(10, 22), max_tokens=1))  # 12 > 11 left
    assert tokens_by_request(step(scheduler)) == {"a": 1}
    assert tokens_by_request(step(scheduler)) == {"a": 1}  # a finishes here
    assert tokens_by_request(step(scheduler)) == {"b": 12}


def test_decodes_scheduled_before_new_prefills():
    scheduler = make_scheduler(num_blocks=32, max_num_batched_tokens=6)
    scheduler.add_request(make_request("a", range(3), max_tokens=8))
    scheduler.add_request(make_request("b", range(10, 13), max_tokens=8))
    step(scheduler)
    scheduler.add_request(make_request("c", range(20, 40), max_tokens=8))
    out = step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"]
    assert tokens_by_request(out) == {"a": 1, "b": 1, "c": 4}
    # While c's prompt is still being chunked, decodes keep their place in front.
    out = step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"]
    assert tokens_by_request(out) == {"a": 1, "b": 1, "c": 4}


def test_waiting_requests_admitted_fcfs():
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=5)
    for i, name in enumerate(["first", "second", "third"]):
        scheduler.add_request(make_request(name, [i] * 5, max_tokens=1))
    admitted = [s.request_id for _ in range(3) for s in step(scheduler).scheduled]
    assert admitted == ["first", "second", "third"]


def test_waiting_head_that_does_not_fit_is_not_overtaken():
    scheduler = make_scheduler(num_blocks=5)
    scheduler.add_request(make_request("running", range(8), max_tokens=2))  # 2 blocks, then 3
    step(scheduler)
    scheduler.add_request(make_request("big", range(10, 22), max_tokens=1))  # needs 3 blocks
    scheduler.add_request(make_request("small", range(30, 33), max_tokens=1))  # would fit in 1
    assert [s.request_id for s in step(scheduler).scheduled] == ["running"]
    assert [s.request_id for s in step(scheduler).scheduled] == ["big", "small"]


def test_max_num_seqs_respected():
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", [i] * 3, max_tokens=2 + i))
    batches = []
    while scheduler.has_unfinished_requests():
        out = step(scheduler)
        assert len(scheduler.running) <= 2
        batches.append(tuple(s.request_id for s in out.scheduled))
    # r2 joins only once r0 (the shortest) has finished, r3 once r1 has.
    assert batches[:4] == [("r0", "r1"), ("r0", "r1"), ("r1", "r2"), ("r2", "r3")]


# ----- prefix caching through the scheduler -------------------------------------------


def test_prefix_cache_hit_skips_prefill():
    scheduler = make_scheduler(num_blocks=16)
    shared = list(range(8))
    scheduler.add_request(make_request("a", shared + [50, 51], max_tokens=1))
    step(scheduler)
    scheduler.add_request(make_request("b", shared + [60, 61, 62], max_tokens=1))
    (s,) = step(scheduler).scheduled
    assert s.num_computed_tokens == 8
    assert s.token_ids == [60, 61, 62]
    kv = scheduler.kv_cache_manager
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 11, 8)


def test_prefix_cache_counts_once_per_admission_not_per_retry():
    scheduler = make_scheduler(num_blocks=3, max_num_seqs=4)
    scheduler.add_request(make_request("a", range(8), max_tokens=4))  # 3 blocks with its outputs
    scheduler.add_request(make_request("b", range(20, 26), max_tokens=1))  # must wait for a
    out = step(scheduler)
    assert tokens_by_request(out) == {"a": 8}
    for _ in range(20):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.prefix_cache_queries == 8 + 6


def test_num_cached_tokens_recorded_at_first_admission():
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(make_request("a", range(10), max_tokens=1))
    step(scheduler)
    late = make_request("b", list(range(8)) + [9, 9], max_tokens=1)
    scheduler.add_request(late)
    step(scheduler)
    assert late.num_cached_tokens == 8


def test_same_step_requests_share_prefix_blocks():
    """The second of two identical prompts admitted together reuses the first's blocks."""
    scheduler = make_scheduler(num_blocks=16)
    runner = FakePagedRunner(16, BLOCK_SIZE)
    scheduler.add_request(make_request("a", range(10), max_tokens=1))
    scheduler.add_request(make_request("b", range(10), max_tokens=1))
    out = scheduler.schedule()
    a, b = out.scheduled
    assert (a.num_computed_tokens, b.num_computed_tokens) == (0, 8)
    assert b.block_ids[:2] == a.block_ids[:2]
    scheduler.update_from_output(out, runner.execute(out))
    assert all_free(scheduler)


# ----- preemption -----------------------------------------------------------------------


def test_preemption_evicts_newest_running_request_and_it_resumes():
    # Two prompts of 7 tokens take 2 blocks each: the whole cache. The 9th token of "old"
    # needs a third block, so "new" (admitted last) must give its blocks back.
    scheduler = make_scheduler(num_blocks=4, max_num_seqs=2)
    runner = FakePagedRunner(4, BLOCK_SIZE)
    old = make_request("old", range(7), max_tokens=4)
    new = make_request("new", range(10, 17), max_tokens=4)
    later = make_request("later", [30, 31], max_tokens=2)  # kept waiting by max_num_seqs
    for request in (old, new, later):
        scheduler.add_request(request)
    for _ in range(2):
        out = scheduler.schedule()
        assert not out.preempted_req_ids
        scheduler.update_from_output(out, runner.execute(out))
    new_outputs = list(new.output_token_ids)
    assert len(new_outputs) == 2

    out = scheduler.schedule()
    assert out.preempted_req_ids == {"new"}
    assert [s.request_id for s in out.scheduled] == ["old"]  # no admission in a preempting step
    assert new.status == RequestStatus.PREEMPTED
    assert new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert list(scheduler.waiting) == [new, later]  # back at the front of the queue
    assert scheduler.running == [old]
    assert scheduler.kv_cache_manager.get_block_ids("new") == []
    assert sum(b.ref_cnt for b in scheduler.kv_cache_manager.block_pool.blocks) == 3
    assert new.output_token_ids == new_outputs  # generated tokens survive preemption
    scheduler.update_from_output(out, runner.execute(out))

    resumed_chunks = []
    for _ in range(20):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        resumed_chunks += [s for s in out.scheduled if s.request_id == "new"]
        scheduler.update_from_output(out, runner.execute(out))
    assert not scheduler.has_unfinished_requests()
    # The first chunk after resuming recomputes the prompt and the outputs generated so far.
    first = resumed_chunks[0]
    assert first.num_computed_tokens + len(first.token_ids) == 7 + len(new_outputs)
    assert first.num_computed_tokens == 4  # its first block was still cached...
    assert new.num_cached_tokens == 0  # ...but the first admission's hit is what is reported
    for request in (old, new, later):
        assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert len(request.output_token_ids) == request.max_tokens
        for i, tok in enumerate(request.output_token_ids):
            assert tok == next_token(request.prompt_token_ids + request.output_token_ids[:i])
    assert all_free(scheduler)


def test_no_admission_in_a_step_that_preempted():
    # "long" is mid-prefill when "short"'s decode takes the block its next chunk needed:
    # it preempts itself. Its freed block would let it be re-admitted for a smaller chunk
    # at once, but a step that had to preempt admits nothing (it would only thrash).
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=8, enable_caching=False)
    scheduler.add_request(make_request("short", range(4), max_tokens=8))
    scheduler.add_request(make_request("long", range(10, 22), max_tokens=1))
    assert tokens_by_request(step(scheduler)) == {"short": 4, "long": 4}
    out = step(scheduler)
    assert out.preempted_req_ids == {"long"}
    assert tokens_by_request(out) == {"short": 1}
    assert tokens_by_request(step(scheduler)) == {"short": 1, "long": 7}


def test_preempted_request_resumes_from_its_cached_blocks():
    scheduler = make_scheduler(num_blocks=5)
    runner = FakePagedRunner(5, BLOCK_SIZE)
    scheduler.add_request(make_request("old", range(7), max_tokens=8))
    new = make_request("new", range(10, 19), max_tokens=8)  # 2 full blocks + 1
    scheduler.add_request(new)
    resumed_at = None
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        for s in out.scheduled:
            if s.request_id == "new" and new.num_preemptions and resumed_at is None:
                resumed_at = s.num_computed_tokens
        scheduler.update_from_output(out, runner.execute(out))
    assert new.num_preemptions >= 1
    assert resumed_at is not None and resumed_at > 0  # its own blocks were still cached
    assert all_free(scheduler)


def test_tiny_block_budget_workload_finishes_without_deadlock():
    num_blocks = 6  # 24 token slots for 8 requests needing up to 20 each
    scheduler = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=16)
    runner = FakePagedRunner(num_blocks, BLOCK_SIZE)
    requests = [make_request(f"r{i}", [i] * (5 + i), max_tokens=15 - i) for i in range(8)]
    for r in requests:
        scheduler.add_request(r)
    for _ in range(500):
        out = scheduler.schedule()
        assert not out.is_empty
        scheduler.update_from_output(out, runner.execute(out))
        if not scheduler.has_unfinished_requests():
            break
    assert not scheduler.has_unfinished_requests(), "workload did not finish"
    assert scheduler.num_preemptions > 0
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert len(r.output_token_ids) == r.max_tokens
    assert all_free(scheduler)


# ----- stopping --------------------------------------------------------------------------


def run_one(request: Request, outputs: list[int]) -> Scheduler:
    """Run `request` alone, feeding it `outputs` one per step until it finishes."""
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(request)
    feed = iter(outputs)
    while scheduler.has_unfinished_requests():
        step(scheduler, sample=lambda _: next(feed))
    return scheduler


def test_max_tokens_finishes_length_capped():
    request = make_request("a", range(5), max_tokens=3)
    scheduler = run_one(request, [1, 2, 3, 4])
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.status.finish_reason == "length"
    assert request.output_token_ids == [1, 2, 3]
    assert request.stop_reason is None
    assert all_free(scheduler)


def test_stop_token_id_after_min_tokens_stops_with_reason():
    request = make_request("a", range(5), max_tokens=10, stop_token_ids=[42], min_tokens=2)
    run_one(request, [1, 42, 3, 42, 5])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [1, 42]
    assert request.stop_reason == 42


def test_stop_token_id_before_min_tokens_does_not_stop():
    request = make_request("a", range(5), max_tokens=10, stop_token_ids=[42], min_tokens=3)
    run_one(request, [42, 42, 1, 42, 5])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [42, 42, 1, 42]


def test_eos_stops_without_stop_reason():
    request = make_request("a", range(5), max_tokens=10, eos_token_ids=frozenset({2}))
    run_one(request, [1, 2, 3])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.status.finish_reason == "stop"
    assert request.output_token_ids == [1, 2]
    assert request.stop_reason is None


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    request = make_request(
        "a", range(5), max_tokens=10, ignore_eos=True, stop_token_ids=[42], eos_token_ids=frozenset({2})
    )
    run_one(request, [2, 2, 42, 5])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [2, 2, 42]
    assert request.stop_reason == 42


def test_eos_before_min_tokens_does_not_stop():
    request = make_request("a", range(5), max_tokens=10, min_tokens=2, eos_token_ids=frozenset({2}))
    run_one(request, [2, 2, 3])
    assert request.output_token_ids == [2, 2]


# ----- finishing from outside, and reporting ------------------------------------------


def test_abort_waiting_request_removes_it_and_is_reported():
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=1)
    running = make_request("running", range(4), max_tokens=8)
    waiting = make_request("waiting", range(10, 14), max_tokens=8)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    step(scheduler)
    scheduler.finish_requests(["waiting"], RequestStatus.FINISHED_ABORTED)
    assert waiting.status == RequestStatus.FINISHED_ABORTED
    assert list(scheduler.waiting) == []
    assert scheduler.get_num_unfinished_requests() == 1
    out = scheduler.schedule()
    assert out.finished_req_ids == {"waiting"}
    assert [s.request_id for s in out.scheduled] == ["running"]


def test_abort_running_request_frees_its_blocks():
    scheduler = make_scheduler(num_blocks=16)
    request = make_request("a", range(10), max_tokens=8)
    scheduler.add_request(request)
    step(scheduler)
    assert scheduler.kv_cache_manager.get_block_ids("a")
    scheduler.finish_requests(["a", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.running == []
    assert scheduler.kv_cache_manager.get_block_ids("a") == []
    assert all_free(scheduler)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # a second abort is a no-op
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_abort_preempted_request_removes_it_from_waiting():
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add_request(make_request("old", range(7), max_tokens=4))
    new = make_request("new", range(10, 17), max_tokens=4)
    scheduler.add_request(new)
    for _ in range(3):
        step(scheduler)
    assert new.status == RequestStatus.PREEMPTED
    scheduler.finish_requests(["new"], RequestStatus.FINISHED_ABORTED)
    assert new not in scheduler.waiting
    while scheduler.has_unfinished_requests():
        step(scheduler)
    assert all_free(scheduler)


def test_abort_between_schedule_and_update_is_ignored():
    scheduler = make_scheduler(num_blocks=16)
    request = make_request("a", range(4), max_tokens=8)
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    updated = scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": FILLER}))
    assert updated == []
    assert request.output_token_ids == []
    assert all_free(scheduler)


def test_finished_req_ids_reported_once_in_next_output():
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(make_request("a", range(4), max_tokens=1))
    scheduler.add_request(make_request("b", range(10, 14), max_tokens=2))
    out = step(scheduler)
    assert out.finished_req_ids == set()
    out = step(scheduler)  # a finished in the step before
    assert out.finished_req_ids == {"a"}
    out = scheduler.schedule()
    assert out.finished_req_ids == {"b"}
    assert out.is_empty
    assert scheduler.schedule().finished_req_ids == set()


def test_update_from_output_returns_requests_that_got_a_token():
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    scheduler.add_request(make_request("short", range(4), max_tokens=1))
    scheduler.add_request(make_request("long", range(10, 30), max_tokens=1))
    out = scheduler.schedule()
    assert {s.request_id: s.sample for s in out.scheduled} == {"short": True, "long": False}
    updated = scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"short": FILLER}))
    assert [r.request_id for r in updated] == ["short"]
    assert updated[0].is_finished


# ----- the invariant, over random workloads --------------------------------------------


def check_block_invariants(scheduler: Scheduler) -> None:
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    refs = Counter()
    running_ids = {r.request_id for r in scheduler.running}
    for request_id, blocks in manager.req_to_blocks.items():
        if blocks:
            assert request_id in running_ids, f"{request_id} holds blocks but is not running"
        refs.update(b.block_id for b in blocks)
    for block in pool.blocks:
        assert block.ref_cnt >= 0
        assert block.ref_cnt == refs[block.block_id], f"block {block.block_id}"
        assert (block.ref_cnt == 0) == (block.block_id in pool._free), f"block {block.block_id}"
    assert sum(len(manager.req_to_blocks.get(r.request_id, [])) for r in scheduler.running) == sum(
        b.ref_cnt for b in pool.blocks
    )
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash
    for request in scheduler.running:
        assert len(manager.get_block_ids(request.request_id)) * scheduler.block_size >= request.num_computed_tokens
    for request in scheduler.waiting:
        assert request.num_computed_tokens == 0


@pytest.mark.parametrize("seed", range(30))
def test_random_workloads_keep_block_invariants(seed: int):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    num_blocks = rng.randint(5, 12)
    capacity = num_blocks * block_size  # one request must always fit alone
    chunked = rng.random() < 0.8
    budget = rng.randint(3, 24) if chunked else capacity
    max_num_seqs = rng.randint(1, 6)
    scheduler = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=capacity,
        enable_caching=rng.random() < 0.8,
        enable_chunked_prefill=chunked,
    )
    runner = FakePagedRunner(num_blocks, block_size)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, capacity // 2))] for _ in range(2)]
    prefixes.append([rng.randrange(VOCAB) for _ in range(block_size * rng.randint(1, num_blocks // 2))])
    eos = frozenset(rng.sample(range(VOCAB), 3))

    def new_request(i: int) -> Request:
        if i and rng.random() < 0.2:  # a repeated prompt: possibly all whole blocks cached
            prompt = list(rng.choice(made).prompt_token_ids)
            return make_request(f"r{i}", prompt, rng.randint(1, min(12, capacity - len(prompt))), block_size)
        prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else []
        # A two-token alphabet repeats blocks under different parents: only chained hashes
        # keep those apart.
        vocab = 2 if rng.random() < 0.3 else VOCAB
        prompt += [rng.randrange(vocab) for _ in range(rng.randint(0 if prompt else 1, 12))]
        prompt = prompt[: capacity - 1]
        max_tokens = rng.randint(1, min(12, capacity - len(prompt)))
        params = {}
        if rng.random() < 0.3:
            params["stop_token_ids"] = rng.sample(range(VOCAB), 4)
            params["min_tokens"] = rng.randint(0, max_tokens)
        if rng.random() < 0.1:
            params["prompt_logprobs"] = 0
        if rng.random() < 0.1:
            params["ignore_eos"] = True
        eos_ids = eos if rng.random() < 0.5 else frozenset()
        return make_request(f"r{i}", prompt, max_tokens, block_size, eos_token_ids=eos_ids, **params)

    made: list[Request] = []
    for i in range(rng.randint(4, 14)):
        made.append(new_request(i))
    pending = list(made)
    requests = list(pending)
    aborted = set()
    reported_finished: set[str] = set()
    for _ in range(rng.randint(1, 4)):  # a first burst, the rest arrive over time
        if pending:
            scheduler.add_request(pending.pop(0))

    for _ in range(3000):
        if pending and rng.random() < 0.3:
            scheduler.add_request(pending.pop(0))
        if rng.random() < 0.05:
            live = [r for r in requests if r.request_id in scheduler.requests]
            if live:
                victim = rng.choice(live)
                scheduler.finish_requests([victim.request_id], RequestStatus.FINISHED_ABORTED)
                aborted.add(victim.request_id)
                check_block_invariants(scheduler)
        if not scheduler.has_unfinished_requests():
            if not pending:
                break
            continue
        out = scheduler.schedule()
        assert not out.is_empty, "unfinished requests but nothing scheduled: deadlock"
        newly_finished = {r.request_id for r in requests if r.is_finished} - reported_finished
        assert out.finished_req_ids == newly_finished
        reported_finished |= newly_finished
        if not chunked:
            assert all(s.sample for s in out.scheduled), "a prompt was chunked"
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.scheduled) <= budget
        assert len(out.scheduled) <= max_num_seqs
        check_block_invariants(scheduler)
        scheduler.update_from_output(out, runner.execute(out))
        check_block_invariants(scheduler)
    else:
        pytest.fail("workload did not finish in 3000 steps")

    pool = scheduler.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert pool.num_free_blocks == num_blocks
    assert scheduler.kv_cache_manager.req_to_blocks == {}
    assert scheduler.requests == {}
    for request in requests:
        assert request.is_finished
        if request.request_id in aborted:
            assert request.status == RequestStatus.FINISHED_ABORTED
            continue
        outputs = request.output_token_ids
        params = request.sampling_params
        assert 1 <= len(outputs) <= request.max_tokens
        for i, tok in enumerate(outputs):
            assert tok == next_token(request.prompt_token_ids + outputs[:i])
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else params.all_stop_token_ids)
        # No token that should have stopped the request was generated before its last one.
        assert not any(t in stops for t in outputs[max(params.min_tokens - 1, 0) : -1])
        if request.status == RequestStatus.FINISHED_LENGTH_CAPPED:
            assert len(outputs) == request.max_tokens
        else:
            assert request.status == RequestStatus.FINISHED_STOPPED
            assert outputs[-1] in stops
            assert len(outputs) >= params.min_tokens
            assert request.stop_reason == (outputs[-1] if outputs[-1] in params.stop_token_ids else None)
    assert pool.reset_prefix_cache()
