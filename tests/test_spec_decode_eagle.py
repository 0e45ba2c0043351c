"""Speculative decoding with an EAGLE-1 head (method "eagle"): the head computes what EAGLE defines, its
paged K/V follows the target's through chunked prefill, preemption and the prefix cache, and the tokens
are the target's own.

Two tiny heads cover the two ways a draft can go. A random head on conftest's random Llama guesses wrong
nearly always; its drafts are compared one by one with a plain PyTorch reference of the head run over the
whole sequence (the target's hidden states from transformers), which they match only if the head's K/V at
every earlier position is the one EAGLE defines. A "perfect" head on `loopy` (the Llama whose next token
depends on the last one only) has as its own embedding the target's final hidden state after each token,
an `fc` that passes it through and a layer that adds nothing, so its guesses are the target's greedy
tokens: every greedy draft is kept, which exercises the accept path end to end.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from eagle_utils import build_eagle_head, perfect_head, reference_eagle_forward
from pagedllm import LLM, SamplingParams
from spec_decode_utils import assert_all_blocks_free, default_model_under_pressure, metric, token_ids
from pagedllm.attention.backend import CommonAttentionMetadata
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.worker.kv_cache import allocate_kv_cache

SHARED = "Continuous batching lets new requests join while others are still decoding. " * 3
PROMPTS = [SHARED + tail for tail in ("The capital", "Hello, my name", "def add(a, b):")] + [
    "The capital of France is Paris.", "naïve café"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def eagle(head: str, k: int = 3) -> dict:
    return {"method": "eagle", "model": head, "num_speculative_tokens": k}


def run(model: str, prompts, params, spec: dict | None = None, **kwargs):
    llm = LLM(model=model, **{"max_model_len": 256, "speculative_config": spec, **kwargs})
    return llm.generate(prompts, params, use_tqdm=False), llm


def hf_target(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def random_head(llama_dir, tmp_path_factory) -> str:
    return build_eagle_head(str(tmp_path_factory.mktemp("eagle_head")), llama_dir, seed=1)


@pytest.fixture(scope="module")
def loopy_dir(tmp_path_factory) -> str:
    from conftest import build_checkpoint

    path = build_checkpoint(str(tmp_path_factory.mktemp("loopy")), "llama", max_position_embeddings=1024)
    model = hf_target(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loopy_head(loopy_dir, tmp_path_factory) -> str:
    return perfect_head(str(tmp_path_factory.mktemp("loopy_head")), loopy_dir)


# ----- configuration ---------------------------------------------------------------------------------------
def test_heads_eagle1_cannot_run_are_refused(llama_dir, random_head, tmp_path):
    import json

    def head_with(name: str, **config) -> str:
        path = tmp_path / name
        shutil.copytree(random_head, path)
        data = json.loads((path / "config.json").read_text())
        data.update(config)
        (path / "config.json").write_text(json.dumps(data))
        return str(path)

    def create(head: str, **kwargs):
        return EngineArgs(model=llama_dir, speculative_config=eagle(head), **kwargs).create_engine_config()

    with pytest.raises(ValueError, match="needs 'model'"):
        LLM("/nonexistent/model", speculative_config={"method": "eagle", "num_speculative_tokens": 3})
    with pytest.raises(NotImplementedError, match="'eagle3'"):
        LLM("/nonexistent/model", speculative_config={"method": "eagle3", "model": "x", "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="EAGLE-3"):
        create(head_with("e3", architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=32))
    with pytest.raises(ValueError, match="hidden size 128, the target 64"):
        create(head_with("wide", hidden_size=128))
    with pytest.raises(ValueError, match="Llama layers"):
        create(head_with("qwen", architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        create(random_head, tensor_parallel_size=2)
    # vLLM's nested form is read as the head inside it
    nested = tmp_path / "nested"
    shutil.copytree(random_head, nested)
    inner = json.loads((nested / "config.json").read_text())
    (nested / "config.json").write_text(json.dumps({"model_type": "eagle", "architectures": ["EAGLEModel"],
                                                    "model": inner}))
    config = create(str(nested))
    assert config.speculative_config.draft_model_config.hf_config.hidden_size == 64


# ----- the head's forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["shared", "own_parts", "pytorch_bin"])
def test_the_head_computes_eagle1s_forward(llama_dir, tmp_path, variant):
    """The loaded head, run over one sequence through its paged K/V, against the reference written from
    EAGLE's definition on the same weights: hidden states and logits (the target's LM head). `own_parts`:
    the head has an fc bias and its own embedding; `pytorch_bin`: the weights come as EAGLE's own
    `pytorch_model.bin`, with a first-layer input norm that EAGLE-1 skips."""
    target = hf_target(llama_dir)
    vocab = target.config.vocab_size
    own_parts = variant == "own_parts"
    embed = torch.randn(vocab, 64, generator=torch.Generator().manual_seed(5)) if own_parts else None
    head_dir = build_eagle_head(str(tmp_path / "head"), llama_dir, seed=2, fc_bias=own_parts, embed_tokens=embed)
    load_dir = head_dir
    if variant == "pytorch_bin":
        from safetensors.torch import load_file

        load_dir = str(tmp_path / "bin")
        shutil.copytree(head_dir, load_dir)
        tensors = load_file(f"{load_dir}/model.safetensors")
        tensors["layers.0.input_layernorm.weight"] = torch.full((64,), 7.0)  # to be ignored: EAGLE-1 skips it
        os.remove(f"{load_dir}/model.safetensors")
        torch.save(tensors, f"{load_dir}/pytorch_model.bin")
    llm = LLM(model=llama_dir, max_model_len=128, speculative_config=eagle(load_dir))
    runner = llm.llm_engine.model_runner
    head = runner.drafter.model
    assert ("embed_tokens" in head._modules) == own_parts and head.shared_logits is not None
    tokens = torch.randint(0, vocab, (41,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        h = target.model(input_ids=torch.tensor([tokens[:-1]])).last_hidden_state[0]
        want = reference_eagle_forward(head_dir, tokens[1:], h, target.model.embed_tokens.weight)
        want_logits = target.lm_head(want)
    n, bs = len(tokens) - 1, runner.block_size
    caches = allocate_kv_cache(runner.drafter.model_config, 8, bs, runner.device)
    meta = runner.attn_metadata_builder.build(CommonAttentionMetadata(
        query_lens=[n], context_lens=[0], block_ids=[[3, 1, 6, 0]], num_decodes=0,
        slot_mapping=np.array([[3, 1, 6, 0][p // bs] * bs + p % bs for p in range(n)]), block_size=bs))
    with torch.inference_mode():
        got = head(torch.tensor(tokens[1:]), torch.arange(n), h, caches, meta)
        got_logits = head.compute_logits(got)
    scale = want_logits.abs().max().item()  # logits of hundreds: float32 sums of 64 products
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5 * scale, rtol=1e-4)
    llm.shutdown()


# ----- the engine ------------------------------------------------------------------------------------------
def record_drafts(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """(the sequence so far, the drafts proposed after it) for every proposal the engine's head makes."""
    drafter = llm.llm_engine.model_runner.drafter
    propose = drafter.propose
    seen: list[tuple[list[int], list[int]]] = []

    def recording(ordered, input_ids, positions, attn_metadata, hidden, sampled, num_accepted, wanted):
        drafts = propose(ordered, input_ids, positions, attn_metadata, hidden, sampled, num_accepted, wanted)
        for req in ordered:
            if req.request_id in drafts:
                kept = req.spec_token_ids[: num_accepted.get(req.request_id, 0)]
                seen.append((req.prompt_token_ids + req.output_token_ids + kept + [sampled[req.request_id]],
                             list(drafts[req.request_id])))
        return drafts

    drafter.propose = recording
    return seen


def reference_drafts(target, head_dir: str, sequence: list[int], k: int) -> list[int]:
    """The head's greedy chain after `sequence`, each step recomputed over the whole sequence; stops early
    where the best two logits are too close for float rounding to be ruled out."""
    with torch.no_grad():
        h = target.model(input_ids=torch.tensor([sequence])).last_hidden_state[0]
        embedding = target.model.embed_tokens.weight
        tokens, hidden = list(sequence[1:]), h[:-1]
        drafts: list[int] = []
        for _ in range(k):
            out = reference_eagle_forward(head_dir, tokens, hidden, embedding)[-1]
            top2 = target.lm_head(out).topk(2)
            if top2.values[0] - top2.values[1] < 1e-3:
                break
            drafts.append(int(top2.indices[0]))
            tokens.append(drafts[-1])
            hidden = torch.cat((hidden, out[None]))
    return drafts


def test_random_head_drafts_are_eagles_and_tokens_the_targets(llama_dir, random_head):
    """A 24-token step budget (chunked prefill), 14 blocks (preemption), then the same prompts from the prefix
    cache, with n=2 and a sampled request in the batch: the greedy tokens are those without speculation, and
    each proposal is the reference head's chain after the sequence it followed."""
    params = [GREEDY, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, n=2), GREEDY, GREEDY,
              SamplingParams(temperature=1.0, top_p=0.9, max_tokens=40, ignore_eos=True, seed=7)]
    reference, plain = run(llama_dir, PROMPTS, params, max_model_len=192, enable_prefix_caching=False)
    plain.shutdown()
    llm = LLM(model=llama_dir, max_model_len=192, speculative_config=eagle(random_head),
              max_num_batched_tokens=24, num_gpu_blocks_override=14)
    seen = record_drafts(llm)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert token_ids(outputs[:4]) == token_ids(reference[:4])
    assert metric(llm, "num_preemptions") > 0 and metric(llm, "spec_decode_num_drafts") > 0
    again = llm.generate(PROMPTS[:4], params[:4], use_tqdm=False)
    assert token_ids(again) == token_ids(reference[:4]) and metric(llm, "prefix_cache_hits") > 0
    target = hf_target(llama_dir)
    compared = 0
    for sequence, drafts in seen[::3]:  # every third proposal keeps the transformers reference quick
        want = reference_drafts(target, random_head, sequence, len(drafts))
        assert drafts[: len(want)] == want, sequence
        compared += len(want)
    assert compared > 100
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_a_head_that_guesses_right_has_every_draft_kept(loopy_dir, loopy_head):
    """The perfect head's greedy drafts are the target's tokens: all are kept (so whole runs of k + 1 tokens
    are emitted per step) through chunked prefill, preemption and the prefix cache, and the tokens are those
    without speculation."""
    reference, plain = run(loopy_dir, PROMPTS, GREEDY, max_model_len=192)
    plain.shutdown()
    outputs, llm = run(loopy_dir, PROMPTS, GREEDY, eagle(loopy_head, k=4), max_model_len=192,
                       max_num_batched_tokens=24, num_gpu_blocks_override=14)
    assert token_ids(outputs) == token_ids(reference) and metric(llm, "num_preemptions") > 0
    drafted = metric(llm, "spec_decode_num_draft_tokens")
    assert metric(llm, "spec_decode_num_accepted_tokens") == drafted > 0
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(again) == token_ids(reference) and metric(llm, "prefix_cache_hits") > 0
    # every step after the first keeps all 4 drafts: far fewer verification steps than tokens
    assert metric(llm, "spec_decode_num_drafts") < 0.3 * 2 * len(PROMPTS) * GREEDY.max_tokens
    assert_all_blocks_free(llm)
    llm.shutdown()


@pytest.mark.real_model
@pytest.mark.slow  # SmolLM2 twice: about a minute on one busy thread
def test_default_model_greedy_is_unchanged_with_a_head(smollm2_gguf, tmp_path):
    """SmolLM2 with an untrained head of its shape (random weights: few drafts kept), copying and writing freely,
    greedy, n=2, with a sampled neighbour, a 48-token step budget, a cache too small for all (preemption),
    then again from the prefix cache: the tokens of the run without speculation."""
    import json

    from pagedllm.model_executor.gguf_loader import load_gguf_config

    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(json.dumps(load_gguf_config(str(smollm2_gguf)).to_dict()))
    head = build_eagle_head(str(tmp_path / "head"), str(tmp_path / "target"), seed=0)

    def drafts_proposed(llm: LLM) -> None:
        assert metric(llm, "spec_decode_num_drafts") > 0

    results = [default_model_under_pressure(spec, 64, drafts_proposed) for spec in (None, eagle(head))]
    assert results[1] == results[0]
    assert results[0][0] == results[0][1]


def test_the_head_keeps_plain_weights_under_a_quantized_target(loopy_dir, loopy_head):
    """A head's checkpoint is plain whatever the target's weights are: under `-q int8` it is built with the
    unquantized linear methods (not the target's W8A8), drafts are kept, and the tokens are the int8 target's."""
    reference, plain = run(loopy_dir, PROMPTS[:3], GREEDY, max_model_len=192, quantization="int8")
    plain.shutdown()
    outputs, llm = run(loopy_dir, PROMPTS[:3], GREEDY, eagle(loopy_head), max_model_len=192, quantization="int8")
    runner = llm.llm_engine.model_runner
    target_method = type(runner.model.layers[0].self_attn.qkv_proj.linear_method)
    assert "Int8" in target_method.__name__ and type(runner.drafter.model.fc.linear_method) is not target_method
    assert token_ids(outputs) == token_ids(reference) and metric(llm, "spec_decode_num_accepted_tokens") > 0
    llm.shutdown()
