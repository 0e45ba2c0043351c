"""Helpers the speculative-decoding test files share (n-gram / draft model, and EAGLE)."""

from __future__ import annotations

from typing import Callable

from pagedllm import LLM, SamplingParams


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def metric(llm: LLM, name: str) -> float:
    """A counter summed over its labels (the per-position acceptance counters carry one each)."""
    return sum(m.value for m in llm.get_metrics() if m.name == "pagedllm:" + name)


def assert_all_blocks_free(llm: LLM) -> None:
    pool = llm.llm_engine.engine_core.core.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks) and pool.num_free_blocks == pool.num_blocks


COPIED_TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, the "
               "members agreed to increase the funding for the public library by ten percent.")


def default_model_under_pressure(spec: dict | None, max_tokens: int, check_drafts: Callable[[LLM], None]
                                 ) -> tuple[list, list]:
    """SmolLM2 copying text from its prompt (drafts mostly accepted) and writing freely (mostly rejected), in
    one batch with a sampled request, n=2, a 48-token step budget (chunked prefill), a cache too small for all
    of them (preemption), then again from the prefix cache. Returns the greedy requests' tokens, first run
    and again; `check_drafts(llm)` asserts on the speculation counters when `spec` is given."""
    chats = [[{"role": "user", "content": f"Copy this text word for word:\n\n{COPIED_TEXT}"}],
             [{"role": "user", "content": "Write a short poem about the ocean."}]]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, n=2),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=max_tokens, ignore_eos=True, seed=0)]
    llm = LLM(speculative_config=spec, max_model_len=256, max_num_batched_tokens=48, num_gpu_blocks_override=16)
    render = llm.get_tokenizer().apply_chat_template
    prompts = [{"prompt_token_ids": render(c, add_generation_prompt=True, tokenize=True, return_dict=False)}
               for c in chats + chats[:1]]
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts[:2], params[:2], use_tqdm=False)
    assert metric(llm, "num_preemptions") > 0 and metric(llm, "prefix_cache_hits") > 0
    if spec is not None:
        check_drafts(llm)
    assert_all_blocks_free(llm)
    llm.shutdown()
    return token_ids(first[:2]), token_ids(again)
