"""How pagedllm's offline throughput scales with the number of concurrent requests (1..64).

Each point runs `c` requests at once (max_num_seqs = c), prompts of random ids with lengths
uniform in 32-256 and 64 greedy output tokens (EOS ignored), on the default model.
Prints a table, writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import random_requests

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--quantization", default=None, choices=["int8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"])
    args = p.parse_args()
    llm = LLM(model=args.model, max_model_len=512, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    vocab = llm.llm_engine.config.model_config.vocab_size
    specials = frozenset(llm.get_tokenizer().all_special_ids)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        reqs = random_requests(c, (32, 256), (args.output_len, args.output_len), vocab, seed=c, avoid_ids=specials)
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"concurrency": c, "elapsed_s": elapsed, "output_tok_s": out_tokens / elapsed,
                     "total_tok_s": (out_tokens + sum(len(r.prompt_token_ids) for r in reqs)) / elapsed})
        print(f"concurrency {c:>3}: {rows[-1]['output_tok_s']:8.1f} output tok/s  {rows[-1]['total_tok_s']:8.1f} total tok/s",
              flush=True)
    stamp = datetime.now(timezone.utc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scaling-{stamp:%Y%m%d-%H%M}-{platform.node()}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "machine": platform.node(), "quantization": args.quantization,
                               "kv_cache_dtype": args.kv_cache_dtype, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
