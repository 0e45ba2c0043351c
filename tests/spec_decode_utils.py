"""Helpers the speculative-decoding test files share (n-gram / draft model, and EAGLE)."""

from __future__ import annotations

from pagedllm import LLM


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def metric(llm: LLM, name: str) -> float:
    """A counter summed over its labels (the per-position acceptance counters carry one each)."""
    return sum(m.value for m in llm.get_metrics() if m.name == "pagedllm:" + name)


def assert_all_blocks_free(llm: LLM) -> None:
    pool = llm.llm_engine.engine_core.core.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks) and pool.num_free_blocks == pool.num_blocks
