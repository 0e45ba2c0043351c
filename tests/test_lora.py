"""LoRA adapters: pagedllm's greedy tokens and logprobs equal PEFT's on transformers (float32) for each
adapter, alone and in batches mixing adapters with the base model, through slot swaps, host-cache
evictions, preemption and prefix caching; the batched shrink/expand equals its per-token definition;
the scheduler never runs more adapters than slots; bad adapters are clear ValueErrors."""

from __future__ import annotations

import math
import os

import pytest
import torch
from lora_utils import build_adapter, peft_greedy

from pagedllm import LLM, SamplingParams
from pagedllm.lora.punica import add_lora_dense, add_lora_reference
from pagedllm.lora.request import LoRARequest
from pagedllm.request import Request

MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Continuous batching lets new requests join while others are still decoding. Prefix caching",
]


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, str]:
    """Three adapters unlike each other: every target at r=8, q/v only at r=4 with rsLoRA, MLP only at r=16."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all8": build_adapter(llama_dir, str(root / "all8"), seed=1, r=8, alpha=16),
        "qv4": build_adapter(llama_dir, str(root / "qv4"), seed=2, r=4, alpha=8, targets=["q_proj", "v_proj"],
                             use_rslora=True, std=0.4),
        "mlp16": build_adapter(llama_dir, str(root / "mlp16"), seed=3, r=16, alpha=8,
                               targets=["gate_proj", "up_proj", "down_proj"]),
    }


@pytest.fixture(scope="module")
def lora_requests(adapters) -> dict[str | None, LoRARequest | None]:
    reqs = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    return {None: None, **reqs}


@pytest.fixture(scope="module")
def references(llama_dir, adapters):
    """PEFT's greedy tokens and logprobs, by (adapter name or None, prompt token ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    cache: dict = {}

    def get(name: str | None, prompt: str) -> tuple[list[int], list[int], list[torch.Tensor]]:
        ids = tokenizer.encode(prompt)
        if (name, prompt) not in cache:
            cache[(name, prompt)] = peft_greedy(llama_dir, adapters.get(name), ids, MAX_TOKENS)
        return (ids, *cache[(name, prompt)])

    return get


def assert_matches_peft(output, expected: list[int], ref_logprobs: list[torch.Tensor], label: str) -> None:
    completion = output.outputs[0]
    assert completion.token_ids == expected, label
    for token, ours, ref in zip(expected, completion.logprobs, ref_logprobs):
        assert math.isclose(ours[token].logprob, ref[token].item(), abs_tol=1e-4), label


def run(llm: LLM, jobs: list[tuple[str | None, str]], lora_requests, references) -> None:
    """Generate every (adapter, prompt) of `jobs` in one call and check each against PEFT."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    prompts = [{"prompt_token_ids": references(name, prompt)[0]} for name, prompt in jobs]
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=[lora_requests[n] for n, _ in jobs])
    for (name, prompt), output in zip(jobs, outputs):
        _, expected, ref = references(name, prompt)
        assert_matches_peft(output, expected, ref, f"adapter {name}: {prompt!r}")


def test_each_adapter_alone_then_all_in_one_batch_match_peft(llama_dir, lora_requests, references):
    llm = LLM(model=llama_dir, max_model_len=256, enable_lora=True, max_loras=3, max_lora_rank=16)
    for name in lora_requests:
        run(llm, [(name, PROMPTS[0])], lora_requests, references)
    # The three adapters and the base model, two prompts each, interleaved in one step.
    run(llm, [(name, p) for p in PROMPTS for name in lora_requests], lora_requests, references)
    outputs = {name: references(name, PROMPTS[0])[1] for name in lora_requests}
    assert len({tuple(v) for v in outputs.values()}) == 4  # the adapters really change the output
    llm.shutdown()


def test_slot_swaps_host_evictions_preemption_and_prefix_caching_match_peft(llama_dir, lora_requests, references):
    """Two slots and two host copies for three adapters: adapters wait for a slot, are evicted and read
    again; a small KV cache preempts; the same prompt under every adapter never shares blocks."""
    llm = LLM(model=llama_dir, max_model_len=64, enable_lora=True, max_loras=2, max_lora_rank=16,
              max_cpu_loras=2, num_gpu_blocks_override=16, block_size=4, max_num_batched_tokens=32)
    jobs = [(name, p) for p in PROMPTS for name in lora_requests] * 2
    for _ in range(2):  # the second round finds every prompt in the prefix cache
        run(llm, jobs, lora_requests, references)
    core = llm.llm_engine.engine_core.core
    assert core.scheduler.num_preemptions > 0
    assert core.kv_cache_manager.prefix_cache_hits > 0
    llm.shutdown()


def test_tp2_shards_the_adapters_like_the_base_layers_and_matches_peft(llama_dir, lora_requests, references):
    """Two worker processes, each with its share of every A and B (column layers: B's rows; row layers:
    A's columns, the partial terms summed by the layer's all-reduce)."""
    llm = LLM(model=llama_dir, max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=16,
              tensor_parallel_size=2)
    run(llm, [(name, p) for p in PROMPTS for name in lora_requests], lora_requests, references)
    llm.shutdown()


def test_prefix_cache_keys_include_the_adapter():
    tokens, params = list(range(40)), SamplingParams()
    base = Request("a", tokens, params, 8, block_size=16)
    one = Request("b", tokens, params, 8, block_size=16, lora_request=LoRARequest("one", 1, "/x"))
    one_again = Request("c", tokens, params, 8, block_size=16, lora_request=LoRARequest("one", 1, "/x"))
    two = Request("d", tokens, params, 8, block_size=16, lora_request=LoRARequest("two", 2, "/y"))
    assert len(base.block_hashes) == 2
    assert one.block_hashes == one_again.block_hashes
    for a, b in ((base, one), (one, two), (base, two)):
        assert not set(a.block_hashes) & set(b.block_hashes)


def test_scheduler_never_runs_more_adapters_than_slots():
    from pagedllm.config import SchedulerConfig
    from pagedllm.core.kv_cache_manager import KVCacheManager
    from pagedllm.core.scheduler import Scheduler

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=64),
                          KVCacheManager(64, 4, True), max_loras=2)
    for i in range(8):  # adapters 1, 2, 3, base, 1, 2, 3, base
        lora = None if i % 4 == 3 else LoRARequest(f"l{i % 4}", i % 4 + 1, "/x")
        scheduler.add_request(Request(str(i), [5, 6, 7, i], SamplingParams(), 4, 4, lora_request=lora))
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["0", "1", "3", "4", "5", "7"]  # 3 and 6 wait for adapter 3
    assert {s.lora_request.lora_int_id for s in out.scheduled if s.lora_request} == {1, 2}
    assert [r.request_id for r in scheduler.waiting] == ["2", "6"]  # their place kept


def by_hand(y, x, a, b, indices, slices):
    """y_t + B_i (A_i x_t) for row t with slot i, slice by slice: each slice's R rows of A, its rows of B."""
    rank = b.shape[2]
    expected = y.float().clone()
    for t, i in enumerate(indices.tolist()):
        if i < 0:
            continue
        for j, (offset, size) in enumerate(slices):
            h = a[i, j * rank : (j + 1) * rank].float() @ x[t].float()
            expected[t, offset : offset + size] += b[offset : offset + size, i].float() @ h
    return expected


# A fused QKV-like layer (three slices of unequal size) and a plain one, 3 slots of rank 8.
SHAPES = [((0, 16), (16, 8), (24, 8)), ((0, 40),)]


@pytest.mark.parametrize("slices", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_shrink_expand_equals_the_per_token_definition(dtype, slices):
    torch.manual_seed(0)
    num_slots, rank, n_in, tokens = 3, 8, 48, 11
    n_out = sum(size for _, size in slices)
    a = torch.randn(num_slots, len(slices) * rank, n_in, dtype=dtype)
    b = torch.randn(n_out, num_slots, rank, dtype=dtype)
    x, y = torch.randn(tokens, n_in, dtype=dtype), torch.randn(tokens, n_out, dtype=dtype)
    indices = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2, 0, 1])
    expected = by_hand(y, x, a, b, indices, slices)
    tol = 1e-4 if dtype == torch.float32 else 0.3
    torch.testing.assert_close(add_lora_reference(y, x, a, b, indices, slices).float(), expected, atol=tol,
                               rtol=tol / 10)
    torch.testing.assert_close(add_lora_dense(y.clone(), x, a, b, indices, slices).float(), expected, atol=tol,
                               rtol=tol / 10)


@pytest.mark.parametrize("slices", [((0, 40), (40, 24), (64, 36)), ((0, 100),)])
def test_triton_shrink_expand_equals_the_reference_under_the_interpreter(slices):
    """The GPU kernels (run by Triton's interpreter on CPU, TRITON_INTERPRET=1 from conftest): odd sizes
    that straddle the tiles, base-model rows, and a slot no row uses."""
    pytest.importorskip("triton")
    from pagedllm.lora.ops.triton_punica import add_lora_triton

    torch.manual_seed(1)
    num_slots, rank, n_in, n_out, tokens = 4, 12, 72, 100, 9
    a, b = torch.randn(num_slots, len(slices) * rank, n_in), torch.randn(n_out, num_slots, rank)
    x, y = torch.randn(tokens, n_in), torch.randn(tokens, n_out)
    indices = torch.tensor([3, -1, 0, 0, 2, -1, 3, 0, 2])
    torch.testing.assert_close(add_lora_triton(y, x, a, b, indices, slices), by_hand(y, x, a, b, indices, slices),
                               atol=1e-4, rtol=1e-4)


def test_bad_adapters_are_clear_value_errors(llama_dir, adapters, tmp_path, lora_requests, references):
    from conftest import build_checkpoint

    llm = LLM(model=llama_dir, max_model_len=256, enable_lora=True, max_loras=1, max_lora_rank=8)
    other_model = build_checkpoint(str(tmp_path / "wider"), "llama", hidden_size=96)
    corrupt = build_adapter(llama_dir, str(tmp_path / "corrupt"), seed=4, r=4)
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(100)
    bad = {
        "rank 16, above max_lora_rank=8": adapters["mlp16"],
        "target module 'lm_head' is not supported": build_adapter(
            llama_dir, str(tmp_path / "head"), seed=5, r=4, targets=["q_proj", "lm_head"]),
        "an adapter of another model": build_adapter(other_model, str(tmp_path / "other"), seed=6, r=4),
        "adapter_model.safetensors is corrupt": corrupt,
        "has no adapter_config.json": str(tmp_path),
        "is not a folder": str(tmp_path / "missing"),
    }
    for i, (message, path) in enumerate(bad.items()):
        with pytest.raises(ValueError, match=message):
            llm.generate("Hello", use_tqdm=False, lora_request=LoRARequest(f"bad{i}", 10 + i, path))
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter 'all8'"):
        llm.generate(["Hello", "Hi"], use_tqdm=False,
                     lora_request=[lora_requests["all8"], LoRARequest("other", 1, adapters["qv4"])])
    with pytest.raises(ValueError, match="got 1 lora requests for 2 prompts"):
        llm.generate(["Hello", "Hi"], use_tqdm=False, lora_request=[lora_requests["all8"]])
    assert not llm.llm_engine.has_unfinished_requests()
    run(llm, [("all8", PROMPTS[0]), (None, PROMPTS[0])], lora_requests, references)  # still serving
    llm.shutdown()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_loras": 0}, "max_loras must be a positive integer"),
    ({"max_lora_rank": -1}, "max_lora_rank must be a positive integer"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras .* must be an integer >= max_loras"),
    ({"runner": "pooling", "convert": "embed"}, "enable_lora .* cannot be used with runner='pooling'"),
])
def test_lora_config_is_checked(llama_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=llama_dir, enable_lora=True, **kwargs)


def test_engine_stats_count_running_and_waiting_adapters(llama_dir, lora_requests):
    """What vLLM's lora_requests_info gauge reports: the adapters of the running and the waiting requests."""
    llm = LLM(model=llama_dir, max_model_len=64, enable_lora=True, max_loras=1, max_lora_rank=16)
    engine = llm.llm_engine
    for i, name in enumerate(["all8", "all8", "qv4", None]):
        engine.add_request(str(i), "Hello", SamplingParams(max_tokens=4), lora_request=lora_requests[name])
    engine.step()  # one adapter slot: the qv4 request waits
    stats = engine.engine_core.core.stats()
    assert stats.max_lora == 1
    assert stats.running_lora_adapters == {"all8": 2} and stats.waiting_lora_adapters == {"qv4": 1}
    while engine.has_unfinished_requests():
        engine.step()
    llm.shutdown()
