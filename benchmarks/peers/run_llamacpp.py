"""llama.cpp (llama-cpp-python) on the original Q4_1 GGUF, one request at a time, greedy, EOS ignored.

The high-level API decodes one sequence at a time; the figure is labelled accordingly.
"""

import os

from common import load_workload, parse_args, timed_run
import numpy as np
from llama_cpp import Llama, LogitsProcessorList

args = parse_args()
prompts, output_len = load_workload(args.workload)
threads = args.threads or os.cpu_count()
llm = Llama(model_path=args.model, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
            verbose=False, logits_all=False)
eos = llm.token_eos()


def mask_eos(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    scores[eos] = -np.inf
    return scores


def generate(prompt: list[int]) -> int:
    llm.reset()
    n = 0
    # Greedy; EOS is masked so every request runs to output_len, as the other engines do.
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True,
                              logits_processor=LogitsProcessorList([mask_eos])):
        n += 1
        if n >= output_len:
            break
    return n


generate(prompts[0][:8])


def run() -> int:
    return sum(generate(p) for p in prompts)


timed_run(run, args.out, engine="llama.cpp (one request at a time)", threads=threads)
