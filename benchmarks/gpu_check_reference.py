"""The reference side of `gpu_check.py`: random-weight checkpoints and transformers.

No weights can be downloaded on the GPU machines, so models are built from configs with random
weights, next to a word-level tokenizer that has one token per id (every id a model emits
decodes). transformers then serves as the reference for correctness and as the baseline for
throughput.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_configs(tiny: bool) -> dict:
    """transformers configs of the models the check builds: tiny ones of each family (as in the
    tests, but on the GPU) and, unless `tiny`, a Qwen3-0.6B-shaped model and a small Llama."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(bos_token_id=1, eos_token_id=2, initializer_range=0.1, rms_norm_eps=1e-6)
    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, **common)
    configs = {
        "qwen3-tiny": Qwen3Config(head_dim=32, tie_word_embeddings=True, **small),
        "qwen2-tiny": Qwen2Config(**small),
        "llama-tiny": LlamaConfig(**{**small, "hidden_size": 96, "num_attention_heads": 6}),  # 3 heads per KV head
    }
    if not tiny:
        configs.update({
            # Qwen/Qwen3-0.6B's config.json
            "qwen3-0.6b-shape": Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                            head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                                            tie_word_embeddings=True, **common),
            # a small Llama: head_dim 64, 3 query heads per KV head
            "llama-small": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                       max_position_embeddings=4096, rope_theta=500000.0, **common),
        })
    return configs


def build_models(workdir: Path, device: torch.device, tiny: bool) -> dict[str, str]:
    """Random-weight checkpoints built on `device` (saved in bf16: the fp32 runs load the same
    values exactly), each with a tokenizer that covers its vocabulary."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for name, config in model_configs(tiny).items():
        path = workdir / name
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        if config.model_type == "qwen2":  # make the Q/K/V biases matter
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.1)
        model.to("cpu").save_pretrained(path)
        build_tokenizer(path, config.vocab_size)
        del model
        free_memory(device)
        paths[name] = str(path)
    return paths


def build_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id, so that every id the model emits decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    del vocab["t0"], vocab["t1"], vocab["t2"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def vocab_size(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def load_hf(model_dir: str, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device=device, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model


@contextlib.contextmanager
def attention_backend(name: str):
    """PAGEDLLM_ATTENTION_BACKEND for the engines built inside (the backend is picked at start-up)."""
    old = os.environ.get("PAGEDLLM_ATTENTION_BACKEND")
    os.environ["PAGEDLLM_ATTENTION_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PAGEDLLM_ATTENTION_BACKEND", None)
        else:
            os.environ["PAGEDLLM_ATTENTION_BACKEND"] = old


def run_pagedllm(model_dir: str, dtype: str, prompts: list[list[int]], max_tokens: int, device: torch.device,
                 backend: str, enforce_eager: bool) -> dict:
    """All prompts as one batch twice: first with a small token budget (chunked prefill) and prompt
    logprobs, then again from the prefix cache. Decodes replay CUDA graphs unless `enforce_eager`."""
    from pagedllm import LLM, SamplingParams

    longest = max(map(len, prompts))
    with attention_backend(backend):
        llm = LLM(model=model_dir, dtype=dtype, max_model_len=longest + max_tokens + 16, seed=0, device=device.type,
                  max_num_batched_tokens=max(64, longest // 3), max_num_seqs=8, enforce_eager=enforce_eager)
    runner = llm.llm_engine.model_runner
    inputs = [{"prompt_token_ids": p} for p in prompts]
    first = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    again = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    rounds = [llm.generate(inputs, first, use_tqdm=False), llm.generate(inputs, again, use_tqdm=False)]
    info = {"backend": type(runner.model.layers[0].self_attn.attn).__name__,
            "graph_replays": runner.cuda_graphs.num_replays if runner.cuda_graphs is not None else 0}
    llm.shutdown()
    del llm, runner
    free_memory(device)
    return {"rounds": rounds, **info}


def compare_with_hf(
    model_dir: str, dtype: str, prompts: list[list[int]], max_tokens: int, device: torch.device,
    engines: dict[str, dict],
) -> dict:
    """pagedllm vs transformers on the same GPU, greedy, for each engine setting in `engines`
    (name -> `run_pagedllm` keyword arguments: backend, enforce_eager).

    transformers gives the reference: its greedy `generate` in fp32, and the logprobs of the very
    same token sequences from one forward pass (teacher forcing), so positions compare even after a
    divergence.

    fp32: every token must equal transformers' greedy tokens. bf16: tokens may part ways after a
    near tie, so the check is on logprobs: pagedllm-bf16's distance to transformers-fp32 must be
    no worse than 1.5x transformers-bf16's own (random-weight models are far noisier in bf16 than
    trained ones, so a fixed tolerance would say more about the model than about the engine).
    """
    ours = {name: run_pagedllm(model_dir, dtype, prompts, max_tokens, device, **kw) for name, kw in engines.items()}

    model = load_hf(model_dir, "float32", device)
    greedy = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        greedy.append(out[0, len(prompt):].tolist())
    # (ours, transformers-fp32, transformers-bf16) logprobs of the same tokens, for every run
    runs = []
    for engine, result in ours.items():
        for round_idx, outs in enumerate(result["rounds"]):
            for prompt, output in zip(prompts, outs):
                comp = output.outputs[0]
                lps = [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs)]
                if output.prompt_logprobs is not None:
                    lps = [output.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0] + lps
                runs.append({"engine": engine, "round": round_idx, "prompt": prompt, "tokens": comp.token_ids,
                             "ours": torch.tensor(lps)})
    for run in runs:
        run["fp32"] = teacher_forced_logprobs(model, run["prompt"] + run["tokens"])[-len(run["ours"]):]
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
        for run in runs:
            run["bf16"] = teacher_forced_logprobs(model, run["prompt"] + run["tokens"])[-len(run["ours"]):]
    del model
    free_memory(device)

    results = {}
    for engine, result in ours.items():
        per_run = []
        engine_runs = [r for r in runs if r["engine"] == engine]
        for run, expected in zip(engine_runs, greedy * 2):
            match = next((j for j, (a, b) in enumerate(zip(run["tokens"], expected)) if a != b), len(expected))
            entry = {"prompt_len": len(run["prompt"]), "round": run["round"], "tokens_matching_hf_fp32": match,
                     "tokens": len(expected),
                     "max_logprob_diff_vs_hf_fp32": (run["ours"] - run["fp32"]).abs().max().item()}
            if "bf16" in run:
                entry["mean_logprob_diff_vs_hf_fp32"] = (run["ours"] - run["fp32"]).abs().mean().item()
                entry["hf_bf16_mean_logprob_diff_vs_hf_fp32"] = (run["bf16"] - run["fp32"]).abs().mean().item()
            per_run.append(entry)
        exact = sum(r["tokens_matching_hf_fp32"] == r["tokens"] for r in per_run)
        graphs_used = device.type != "cuda" or engines[engine].get("enforce_eager", False) or result["graph_replays"]
        if dtype == "float32":
            max_diff = max(r["max_logprob_diff_vs_hf_fp32"] for r in per_run)
            passed = exact == len(per_run) and max_diff < 1e-2
            summary = f"{exact}/{len(per_run)} token-exact, max |dlogprob| {max_diff:.1e}"
        else:
            mine = sum(r["mean_logprob_diff_vs_hf_fp32"] for r in per_run) / len(per_run)
            theirs = sum(r["hf_bf16_mean_logprob_diff_vs_hf_fp32"] for r in per_run) / len(per_run)
            passed = mine <= 1.5 * theirs + 1e-2
            summary = f"mean |dlogprob| {mine:.3f} vs HF-bf16 {theirs:.3f}; {exact}/{len(per_run)} = fp32 greedy"
        if not graphs_used:
            passed, summary = False, summary + "; CUDA graphs were never replayed"
        results[engine] = {"passed": passed, "summary": summary, "backend": result["backend"],
                           "graph_replays": result["graph_replays"], "runs": per_run}
    return results


def teacher_forced_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward pass, in fp32."""
    t = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        logits = model(t).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, t[0, 1:, None])[:, 0].cpu()


def hf_generate_throughput(
    model_dir: str, prompts: list[list[int]], out_lens: list[int], dtype: str, device: torch.device, batch_size: int
) -> dict:
    """transformers `generate`, greedy, left-padded batches; only each request's own tokens count."""
    model = load_hf(model_dir, dtype, device)
    with torch.inference_mode():  # warm-up
        model.generate(torch.tensor([prompts[0][:8]], device=device), max_new_tokens=2, do_sample=False)
    sync(device)
    start = time.perf_counter()
    complete = True
    for i in range(0, len(prompts), batch_size):
        batch, lens = prompts[i : i + batch_size], out_lens[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), do_sample=False)
        complete &= out.shape[1] - width == max(lens)
    sync(device)
    elapsed = time.perf_counter() - start
    del model
    free_memory(device)
    return {"requests": len(prompts), "batch_size": batch_size, "elapsed_s": elapsed,
            "output_tokens": sum(out_lens), "output_tok_s": sum(out_lens) / elapsed,
            "generated_every_requested_token": complete}


def hf_generate_batch_throughput(
    model_dir: str, prompts: list[list[int]], out_lens: list[int], dtype: str, device: torch.device
) -> dict:
    """transformers' continuous batching (`generate_batch`), greedy, EOS off.

    `generate_batch` takes one `max_new_tokens` for all requests, so every request runs to the
    longest requested length and all the tokens it generates count (a more decode-heavy mix than
    pagedllm's run on the same prompts; the JSON records both totals).
    """
    from transformers import GenerationConfig

    model = load_hf(model_dir, dtype, device)
    if not hasattr(model, "generate_batch"):
        raise RuntimeError("this transformers has no continuous batching (generate_batch)")
    config = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    sync(device)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    del model
    free_memory(device)
    if not generated:
        raise RuntimeError(f"generate_batch returned no tokens ({len(results)} results)")
    return {"requests": len(prompts), "finished": len(results), "max_new_tokens": max(out_lens),
            "elapsed_s": elapsed, "output_tokens": generated, "output_tok_s": generated / elapsed}
