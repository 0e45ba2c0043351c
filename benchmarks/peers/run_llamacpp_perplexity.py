"""llama.cpp's perplexity on token windows (llama-cpp-python, run in its own environment by
`benchmarks/precision_check.py --llamacpp-python`): every window evaluated in one batch with all
logits kept, each token scored by the log-softmax of the previous position's logits.

    python run_llamacpp_perplexity.py WINDOWS.json OUT.json   (WINDOWS: {"model": gguf, "windows": [[ids]]})
"""

import json
import math
import sys

import llama_cpp
import numpy as np

spec = json.load(open(sys.argv[1]))
llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=max(len(w) for w in spec["windows"]) + 8, n_batch=512,
                      logits_all=True, verbose=False, n_threads=spec.get("threads", 2))
nll, count = 0.0, 0
for window in spec["windows"]:
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    for pos in range(1, len(window)):
        nll += log_z[pos - 1] - logits[pos - 1, window[pos]]
        count += 1
json.dump({"perplexity": math.exp(nll / count), "scored_tokens": count, "llama_cpp_version": llama_cpp.__version__},
          open(sys.argv[2], "w"))
