"""Decode CUDA graphs: bucketing, padding and static buffers, checked on CPU.

The real `torch.cuda.CUDAGraph` needs a GPU (`benchmarks/gpu_check.py` runs it); here the graph
is `EagerGraph`, which replays by calling the captured function again over the same static
buffers. That is enough to prove that a padded replay gives the tokens an eager step gives and
that padding rows write only the padding block. The Triton kernels run under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.torch_paged_attention import TorchPagedAttentionBackend
from pagedllm.worker.cuda_graph_runner import (
    DecodeBuffers,
    DecodeGraphRunner,
    EagerGraph,
    capture_sizes,
    cuda_graphs_wanted,
    padded_batch_size,
)

pytest.importorskip("triton")
from pagedllm.attention.triton_paged_attention import TritonAttentionMetadataBuilder  # noqa: E402
from pagedllm.attention.triton_paged_attention import TritonPagedAttentionBackend  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_capture_sizes_follow_vllm():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]  # max_num_seqs itself always has a graph
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(2048)[-1] == 512


def test_padded_batch_size_is_the_smallest_graph_that_fits():
    sizes = [1, 2, 4, 8, 16]
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert padded_batch_size(17, sizes) is None  # more decodes than the largest graph: eager


def test_graphs_only_on_cuda_without_enforce_eager_with_the_triton_backend():
    assert cuda_graphs_wanted(CUDA, False, TritonPagedAttentionBackend)
    assert not cuda_graphs_wanted(CPU, False, TritonPagedAttentionBackend)
    assert not cuda_graphs_wanted(CUDA, True, TritonPagedAttentionBackend)
    assert not cuda_graphs_wanted(CUDA, False, TorchPagedAttentionBackend)


def test_decode_buffers_send_padding_rows_to_the_padding_block():
    bs, padding_block = 4, 9
    buffers = DecodeBuffers(max_batch=8, max_blocks=3, padding_block=padding_block, block_size=bs, device=CPU)
    # positions 0, 5 and 9: blocks 0, 1 and 2 of their tables
    buffers.fill([11, 12, 13], [0, 5, 9], [[3], [4, 6], [7, 8, 2]], size=4)
    assert buffers.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert buffers.positions[:4].tolist() == [0, 5, 9, 0]
    assert buffers.slot_mapping[:4].tolist() == [3 * bs + 0, 6 * bs + 1, 2 * bs + 1, padding_block * bs]
    assert buffers.seq_lens[:4].tolist() == [1, 6, 10, 1]
    assert buffers.block_tables[3].tolist() == [padding_block] * 3
    assert buffers.block_tables[1, :2].tolist() == [4, 6]
    meta = buffers.metadata(4, TritonAttentionMetadataBuilder(CPU, torch.float32, torch.float32))
    assert meta.num_decodes == 4 and meta.max_prefill_query_len == 0
    assert meta.max_decode_seq_len == 3 * bs  # the longest sequence a table holds: splits sized for any length
    assert meta.block_tables.shape == (4, 3)  # always max_blocks wide: one graph for every length
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    # A smaller batch next: stale rows beyond it are padding again.
    buffers.fill([21], [2], [[5]], size=2)
    assert buffers.slot_mapping[:2].tolist() == [5 * bs + 2, padding_block * bs]


class CountingEagerGraph(EagerGraph):
    replays: list[int] = []

    def replay(self) -> torch.Tensor:
        CountingEagerGraph.replays.append(self.output.shape[0])
        return super().replay()


def install_eager_graphs(llm, sizes: list[int]) -> DecodeGraphRunner:
    runner = llm.llm_engine.model_runner
    graphs = DecodeGraphRunner(
        runner.model, runner.kv_caches, runner.block_size, llm.llm_engine.config.model_config.max_model_len,
        sizes, padding_block=runner.num_blocks, device=runner.device, metadata_builder=runner.attn_metadata_builder,
        graph_factory=CountingEagerGraph,
    )
    graphs.capture()
    runner.cuda_graphs = graphs
    return graphs


PROMPTS = ["Hello, my name is", "The capital of France is", "Prefix caching shares blocks", "a"]


@pytest.mark.parametrize(("family", "block_size"), [("llama", 16), ("qwen3", 32)])
def test_padded_graph_replay_gives_the_same_tokens_as_eager(family, block_size, request, monkeypatch):
    from pagedllm import LLM, SamplingParams

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    model_dir = request.getfixturevalue(f"{family}_dir")
    # Different lengths: the batch shrinks 4 -> 3 -> 2 -> 1 decodes, replayed as 4, 4, 2, 1 rows.
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=1) for n in (9, 3, 6, 12)]
    results = []
    for graphs in (False, True):
        llm = LLM(model=model_dir, max_model_len=96, block_size=block_size, max_num_seqs=4, dtype="float32")
        if graphs:
            CountingEagerGraph.replays = []
            install_eager_graphs(llm, [1, 2, 4])
        results.append(llm.generate(PROMPTS, params, use_tqdm=False))
        llm.shutdown()
    assert sorted(set(CountingEagerGraph.replays)) == [1, 2, 4]
    for eager, graphed in zip(*results):
        assert graphed.outputs[0].token_ids == eager.outputs[0].token_ids
        for token, lp_eager, lp_graph in zip(eager.outputs[0].token_ids, eager.outputs[0].logprobs,
                                             graphed.outputs[0].logprobs):
            assert lp_graph[token].logprob == pytest.approx(lp_eager[token].logprob, abs=1e-5)


def test_padded_rows_write_only_the_padding_block(llama_dir, monkeypatch):
    from pagedllm import LLM, SamplingParams

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    llm = LLM(model=llama_dir, max_model_len=64, block_size=16, max_num_seqs=4, dtype="float32",
              num_gpu_blocks_override=12)
    runner = llm.llm_engine.model_runner
    graphs = install_eager_graphs(llm, [1, 2, 4])
    engine = llm.llm_engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=8))
    engine.step()  # the three prompts' prefill (eager)
    sched = engine.engine_core.core.scheduler.schedule()  # three decodes: replayed padded to 4 rows
    assert graphs.can_run(sched) and len(sched.scheduled) == 3
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    CountingEagerGraph.replays = []
    out = runner.execute_model(sched)
    assert CountingEagerGraph.replays == [4] and len(out.sampled_token_ids) == 3
    live_slots = {r.block_ids[r.num_computed_tokens // 16] * 16 + r.num_computed_tokens % 16 for r in sched.scheduled}
    padding = set(range(runner.num_blocks * 16, (runner.num_blocks + 1) * 16))
    for (k0, v0), (k1, v1) in zip(before, runner.kv_caches):
        for old, new in ((k0, k1), (v0, v1)):
            changed = (old != new).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
            assert set(changed) <= live_slots | padding
            assert live_slots <= set(changed)  # the live rows were written
    llm.shutdown()


def test_prefills_and_oversized_batches_run_eagerly(llama_dir, monkeypatch):
    from pagedllm import LLM, SamplingParams

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    llm = LLM(model=llama_dir, max_model_len=64, max_num_seqs=4, dtype="float32")
    graphs = install_eager_graphs(llm, [1, 2])
    engine = llm.llm_engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1))
    prefill = engine.engine_core.core.scheduler.schedule()
    assert not graphs.can_run(prefill)  # prompts
    engine.engine_core.core.scheduler.update_from_output(prefill, engine.model_runner.execute_model(prefill))
    decodes = engine.engine_core.core.scheduler.schedule()
    assert len(decodes.scheduled) == 3 and not graphs.can_run(decodes)  # 3 > the largest graph (2)
    llm.shutdown()
