"""The compiled elementwise ops (torch.compile, inductor on CPU) equal the eager reference, and a
whole generation with them gives the eager engine's greedy tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers import fused_ops
from pagedllm.model_executor.layers.fused_ops import CPU_MIN_ROWS, EAGER_OPS, FusedOps, fused_ops_for


@pytest.mark.parametrize("rows", [CPU_MIN_ROWS - 1, CPU_MIN_ROWS + 37])
def test_compiled_ops_equal_the_eager_ones(rows):
    torch.manual_seed(0)
    ops = FusedOps(compiled=True, min_rows=CPU_MIN_ROWS)
    x, r, w = torch.randn(rows, 96), torch.randn(rows, 96), torch.randn(96)
    gate_up = torch.randn(rows, 2 * 80)
    q, cos, sin = torch.randn(rows, 6, 32), torch.randn(rows, 1, 16), torch.randn(rows, 1, 16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), fused_ops.rms_norm(x, w, 1e-6))
    for got, want in zip(ops.add_rms_norm(x, r, w, 1e-6), fused_ops.add_rms_norm(x, r, w, 1e-6)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), fused_ops.silu_and_mul(gate_up))
    torch.testing.assert_close(ops.rotate(q, cos, sin), fused_ops.rotate(q, cos, sin))
    # Only batches of at least min_rows rows go through the compiled graphs.
    assert bool(ops._compiled) == (rows >= CPU_MIN_ROWS)


def test_the_flag_picks_compiled_ops_per_device(monkeypatch):
    # Without the CPU kernels (their own tests cover the kernel-backed op set).
    monkeypatch.setattr(fused_ops.cpu_ops, "cpu_kernels_available", lambda: False)
    assert fused_ops_for(torch.device("cpu"), False) is EAGER_OPS
    cpu = fused_ops_for(torch.device("cpu"), True)
    assert cpu.compiled and cpu.min_rows == CPU_MIN_ROWS
    assert fused_ops_for(torch.device("cuda"), True).min_rows == 0


def test_generation_with_compiled_ops_equals_eager(llama_dir):
    # A prompt longer than CPU_MIN_ROWS, so its prefill runs the compiled ops; decodes stay eager.
    prompt = {"prompt_token_ids": [(7 * i) % 300 + 3 for i in range(CPU_MIN_ROWS + 20)]}
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    outs = {}
    for compiled in (False, True):
        llm = LLM(model=llama_dir, max_model_len=512, compile_fused_ops=compiled)
        model = llm.llm_engine.model_runner.model
        assert model.norm.fused_ops.compiled == compiled
        outs[compiled] = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert bool(model.norm.fused_ops._compiled) == compiled  # the prefill did take the compiled ops
        llm.shutdown()
    assert outs[True].token_ids == outs[False].token_ids
    for a, b in zip(outs[True].logprobs, outs[False].logprobs):
        for token, lp in a.items():
            assert lp.logprob == pytest.approx(b[token].logprob, abs=1e-4)
