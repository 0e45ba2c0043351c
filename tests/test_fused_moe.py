"""The fused-MoE layer's pieces against their references: routing against transformers' routers,
the PyTorch reference against the per-token definition, the CPU path and the Triton kernel (under
TRITON_INTERPRET=1 here) against the reference; and the checks on bad weights and parallel sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pagedllm.config import ParallelConfig
from pagedllm.model_executor.layers.cpu_packed_linear import cpu_packing_available, reorder_for_onednn
from pagedllm.model_executor.layers.fused_moe import FusedMoE, fused_topk
from pagedllm.model_executor.layers.fused_moe.cpu import CpuFusedMoEMethod, fused_experts_cpu
from pagedllm.model_executor.layers.fused_moe.reference import fused_experts_reference, silu_and_mul
from pagedllm.model_executor.layers.fused_moe.triton_moe import fused_experts_triton, moe_align_block_size

NUM_EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 4, 32, 48, 2


def random_experts(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=g) * 0.2
    w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=g) * 0.2
    return w13.to(dtype), w2.to(dtype)


def random_routing(num_tokens: int, seed: int, skip_expert: int | None = None) -> tuple[torch.Tensor, ...]:
    """Tokens, and their top-2 routing; `skip_expert` gets no token (an expert idle in a step)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=g)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9
    weights, ids = fused_topk(logits, TOP_K, renormalize=True)
    return x, weights, ids


def per_token(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, one token and one expert at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].double() @ x[t].double()
            gate, up = h.chunk(2)
            out[t] += float(weights[t, k]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_topk_matches_the_transformers_routers(renormalize):
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    if renormalize:
        router = MixtralTopKRouter(MixtralConfig(hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2))
    else:
        router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=2,
                                                   norm_topk_prob=False))
    router.weight.data.normal_()
    x = torch.randn(50, HIDDEN)
    logits, hf_weights, hf_ids = router(x)
    weights, ids = fused_topk(logits, 2, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float())
    assert torch.allclose(weights.sum(-1), torch.ones(50)) == renormalize


@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_reference_equals_the_per_token_definition(num_tokens):
    w13, w2 = random_experts()
    x, weights, ids = random_routing(num_tokens, seed=num_tokens, skip_expert=2)
    out = fused_experts_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), per_token(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def experts_layer(method, dtype=torch.float32) -> FusedMoE:
    layer = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, renormalize=True, quant_method=method).to(dtype)
    w13, w2 = random_experts(dtype)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.skipif(not cpu_packing_available(torch.device("cpu"), torch.float32), reason="no oneDNN packing")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_cpu_path_equals_the_reference(num_tokens, dtype):
    w13, w2 = random_experts(dtype)
    layer = experts_layer(CpuFusedMoEMethod(), dtype)
    assert layer.w13_weight is None  # replaced by the packed copies
    for skip in (None, 1):
        x, weights, ids = random_routing(num_tokens, seed=num_tokens, skip_expert=skip)
        x = x.to(dtype)
        ours = layer.quant_method.apply(layer, x, weights, ids)
        ref = fused_experts_reference(x, w13, w2, weights, ids)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        # Expert parallelism: experts 2 and 3 live on another rank (local id 2 means "not here").
        ids_ep = torch.where(ids < 2, ids, 2)
        ours_ep = fused_experts_cpu_half(x, w13, w2, weights, ids_ep)
        ref_ep = fused_experts_reference(x, w13[:2], w2[:2], weights, ids_ep)
        torch.testing.assert_close(ours_ep, ref_ep, rtol=tol, atol=tol)


def fused_experts_cpu_half(x, w13, w2, weights, ids) -> torch.Tensor:
    """The CPU path on a rank that holds experts 0 and 1."""
    return fused_experts_cpu(x, [reorder_for_onednn(w) for w in w13[:2]], [reorder_for_onednn(w) for w in w2[:2]],
                             weights, ids, silu_and_mul)


@pytest.mark.parametrize("num_tokens", [1, 9, 40])
def test_triton_kernel_equals_the_reference(num_tokens):
    w13, w2 = random_experts()
    x, weights, ids = random_routing(num_tokens, seed=num_tokens, skip_expert=3 if num_tokens == 9 else None)
    ref = fused_experts_reference(x, w13, w2, weights, ids)
    for block_m in (16, 32):  # one block per expert, or many
        torch.testing.assert_close(fused_experts_triton(x, w13, w2, weights, ids, silu_and_mul, block_m), ref,
                                   rtol=1e-5, atol=1e-5)
    ids_ep = torch.where(ids >= 2, ids - 2, 2)  # this rank holds experts 2 and 3; local id 2: not here
    torch.testing.assert_close(fused_experts_triton(x, w13[2:], w2[2:], weights, ids_ep, silu_and_mul),
                               fused_experts_reference(x, w13[2:], w2[2:], weights, ids_ep), rtol=1e-5, atol=1e-5)


def test_moe_align_block_size_gives_each_block_one_expert():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [4, 2]])  # 4: an expert of another rank
    sorted_pair_ids, block_expert_ids = moe_align_block_size(ids, block_m=4, num_experts=4)
    num_pairs = ids.numel()
    flat = ids.flatten()
    seen = []
    for block, expert in enumerate(block_expert_ids.tolist()):
        pairs = [p for p in sorted_pair_ids[block * 4:(block + 1) * 4].tolist() if p < num_pairs]
        if expert < 0:
            assert pairs == []
            continue
        assert all(int(flat[p]) == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == [p for p in range(num_pairs) if int(flat[p]) < 4]


def test_expert_weights_of_the_wrong_shape_are_refused():
    layer = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, renormalize=True)
    with pytest.raises(ValueError, match=r"has shape \(48, 48\), expected \(48, 32\)"):
        layer.weight_loader(layer.w13_weight, torch.zeros(48, 48), ("w1", 0))
    with pytest.raises(ValueError, match="expert 4, but the model has 4 experts"):
        layer.weight_loader(layer.w2_weight, torch.zeros(HIDDEN, INTERMEDIATE), ("w2", 4))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(NUM_EXPERTS, 5, HIDDEN, INTERMEDIATE, renormalize=True)


def test_tensor_parallel_must_divide_the_expert_size_or_the_experts():
    moe = SimpleNamespace(num_attention_heads=8, num_key_value_heads=4, intermediate_size=128, num_experts=6,
                          moe_intermediate_size=66)
    cpu = torch.device("cpu")
    ParallelConfig(tensor_parallel_size=2).verify_with_model(moe, cpu)
    ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True).verify_with_model(moe, cpu)
    with pytest.raises(ValueError, match=r"must divide the model's moe_intermediate_size \(66\)"):
        ParallelConfig(tensor_parallel_size=4).verify_with_model(moe, cpu)
    with pytest.raises(ValueError, match=r"must divide the model's number of experts \(6\)"):
        ParallelConfig(tensor_parallel_size=4, enable_expert_parallel=True).verify_with_model(
            SimpleNamespace(**{**vars(moe), "moe_intermediate_size": 64}), cpu)
    with pytest.raises(ValueError, match=r"must divide the model's shared_expert_intermediate_size \(6\)"):
        ParallelConfig(tensor_parallel_size=4).verify_with_model(
            SimpleNamespace(**{**vars(moe), "moe_intermediate_size": 64, "shared_expert_intermediate_size": 6}), cpu)
