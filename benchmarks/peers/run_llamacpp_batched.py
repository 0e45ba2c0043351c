"""llama.cpp (llama-cpp-python) on the original Q4_1 GGUF, all sequences decoded together, greedy, EOS ignored.

The high-level `Llama` API decodes one sequence at a time; llama.cpp itself batches many
sequences in one `llama_decode` call (each token tagged with its sequence id, as its
`batched` example does). This runner drives that low-level API: prompts are prefilled in
batches of up to `n_batch` tokens with logits only at each prompt's last token, then every
step feeds one token per sequence; sampling is a numpy argmax with EOS masked.
"""

import ctypes
import os

import llama_cpp
import numpy as np
from common import load_workload, parse_args, timed_run


def _first(*names):
    """The first of several names the bindings have used for one function across versions."""
    for name in names:
        if hasattr(llama_cpp, name):
            return getattr(llama_cpp, name)
    raise AttributeError(f"llama_cpp has none of {names}")


args = parse_args()
prompts, output_len = load_workload(args.workload)
threads = args.threads or os.cpu_count()
num_seqs = len(prompts)
N_BATCH = 2048

llama_cpp.llama_backend_init()
model = _first("llama_model_load_from_file", "llama_load_model_from_file")(
    args.model.encode(), llama_cpp.llama_model_default_params())
cparams = llama_cpp.llama_context_default_params()
per_seq = max(len(p) for p in prompts) + output_len + 8
cparams.n_ctx = num_seqs * per_seq  # split evenly between the sequences' KV
cparams.n_batch = N_BATCH
cparams.n_ubatch = 512
cparams.n_seq_max = num_seqs
cparams.n_threads = threads
cparams.n_threads_batch = threads
ctx = _first("llama_init_from_model", "llama_new_context_with_model")(model, cparams)
vocab = llama_cpp.llama_model_get_vocab(model)
n_vocab = _first("llama_vocab_n_tokens", "llama_n_vocab")(vocab)
eos = _first("llama_vocab_eos", "llama_token_eos")(vocab)
batch = llama_cpp.llama_batch_init(max(N_BATCH, num_seqs), 0, 1)


def clear_kv() -> None:
    if hasattr(llama_cpp, "llama_memory_clear"):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    else:
        _first("llama_kv_self_clear", "llama_kv_cache_clear")(ctx)


def decode(entries: list[tuple[int, int, int, bool]]) -> None:
    """One llama_decode over (token, position, sequence id, wants logits) entries."""
    batch.n_tokens = len(entries)
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def greedy(index: int) -> int:
    ptr = llama_cpp.llama_get_logits_ith(ctx, index)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()
    logits[eos] = -np.inf
    return int(logits.argmax())


def generate(prompt_list: list[list[int]], max_new: int) -> int:
    clear_kv()
    n = len(prompt_list)
    last: list[int] = [0] * n
    # Prefill: pack prompts into batches of up to N_BATCH tokens; logits at each prompt's last token.
    pending: list[tuple[int, int, int, bool]] = []
    owners: list[tuple[int, int]] = []  # (sequence, index in the pending batch)

    def flush() -> None:
        decode(pending)
        for seq, idx in owners:
            last[seq] = greedy(idx)
        pending.clear()
        owners.clear()

    for seq, prompt in enumerate(prompt_list):
        for pos, token in enumerate(prompt):
            if len(pending) == N_BATCH:
                flush()
            is_last = pos == len(prompt) - 1
            if is_last:
                owners.append((seq, len(pending)))
            pending.append((token, pos, seq, is_last))
    if pending:
        flush()
    produced = n
    for step in range(1, max_new):
        decode([(last[seq], len(prompt_list[seq]) + step - 1, seq, True) for seq in range(n)])
        last = [greedy(i) for i in range(n)]
        produced += n
    return produced


generate([p[:8] for p in prompts[:2]], 2)


def run() -> int:
    return generate(prompts, output_len)


timed_run(run, args.out, engine="llama.cpp (all sequences batched, Q4_1)", threads=threads)
