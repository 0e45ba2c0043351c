"""oneDNN-packed linear weights on CPU (`layers/cpu_packed_linear.py`, `CpuPackedLinearMethod`) compute
what `F.linear` computes, in the layers and through a whole generation, and replace the plain weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers.cpu_packed_linear import CpuPackedLinearMethod, cpu_packing_available
from pagedllm.model_executor.model_loader import process_weights_after_loading

pytestmark = pytest.mark.skipif(not cpu_packing_available(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_packed_layers_equal_plain_linear(random_linear_layers, dtype, rows):
    qkv, down, x_qkv, x_down = random_linear_layers(dtype, rows, CpuPackedLinearMethod())
    want = [F.linear(x_qkv, qkv.weight, qkv.bias), F.linear(x_down, down.weight)]
    model = torch.nn.ModuleList([qkv, down])
    assert process_weights_after_loading(model)["packed for oneDNN"][0] == 2
    assert qkv.weight is None and qkv.packed_weight is not None  # held once, packed
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    torch.testing.assert_close(qkv(x_qkv), want[0], **tol)
    torch.testing.assert_close(down(x_down), want[1], **tol)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_generation_with_packed_weights_equals_plain(family, request, monkeypatch):
    """Qwen3's fixture ties its LM head to the embedding: the head gets a packed copy, and the
    embedding lookup keeps its plain matrix."""
    model_dir = request.getfixturevalue(f"{family}_dir")
    prompts = ["hello world", "the quick brown fox jumps over"]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, ignore_eos=True)
    results = {}
    for packed in (True, False):
        if not packed:
            monkeypatch.setenv("PAGEDLLM_CPU_KERNELS", "0")
        llm = LLM(model=model_dir, max_model_len=256)
        model = llm.llm_engine.model_runner.model
        qkv = model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv.linear_method, CpuPackedLinearMethod) == packed
        assert (getattr(qkv, "packed_weight", None) is not None) == packed
        if model.tie_word_embeddings:
            assert model.embed_tokens.weight is not None
            assert (getattr(model.embed_tokens, "packed_weight", None) is not None) == packed
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        results[packed] = [(o.outputs[0].token_ids, [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
                           for o in outs]
    for (tokens_p, lps_p), (tokens_u, lps_u) in zip(results[True], results[False]):
        assert tokens_p == tokens_u
        torch.testing.assert_close(torch.tensor(lps_p), torch.tensor(lps_u), atol=1e-4, rtol=0)
