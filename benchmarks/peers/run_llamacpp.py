"""llama.cpp (llama-cpp-python) on the original Q4_1 GGUF, greedy, EOS masked (so every request runs to output_len).

Default, "all sequences decoded together": the low-level API, one llama_context with
n_seq_max = the number of prompts and a KV stream per sequence (kv_unified off, as llama.h
advises for sequences that share no prefix). Each prompt is its own seq_id; the prompts are
prefilled packed into batches of at most n_batch tokens (logits only for each prompt's last
token), then every llama_decode call advances all unfinished sequences by one token, with a
greedy argmax over their logits.

--one-at-a-time: the high-level Llama.generate, one request after another (the older figure).

Both modes leave flash attention off (Llama()'s default), so their greedy tokens can be compared.
"""

import ctypes
import json
import os

from common import load_workload, parse_args, timed_run
import llama_cpp as lc
import numpy as np

N_BATCH = 512  # most tokens per llama_decode call in the prefill (llama.cpp's default n_ubatch)

args = parse_args()
prompts, output_len = load_workload(args.workload)
threads = args.threads or os.cpu_count()
outputs: list[list[int]] = []


def one_at_a_time():
    from llama_cpp import Llama, LogitsProcessorList

    llm = Llama(model_path=args.model, n_ctx=1024, n_batch=N_BATCH, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    eos = llm.token_eos()

    def mask_eos(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores[eos] = -np.inf
        return scores

    def generate(prompt: list[int]) -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True,
                                  logits_processor=LogitsProcessorList([mask_eos])):
            out.append(int(token))
            if len(out) >= output_len:
                break
        return out

    generate(prompts[0][:8])

    def run() -> int:
        outputs[:] = [generate(p) for p in prompts]
        return sum(len(o) for o in outputs)

    return "llama.cpp (one request at a time)", run


@lc.llama_log_callback
def _quiet(level, text, user_data):
    pass


def batched():
    lc.llama_log_set(_quiet, ctypes.c_void_p(0))
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(args.model.encode(), lc.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.model}")
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    eos = lc.llama_vocab_eos(vocab)

    n_seq = len(prompts)
    cp = lc.llama_context_default_params()
    cp.n_seq_max = n_seq
    # Per-sequence context: the longest prompt plus its outputs (llama.cpp rounds it up to 256).
    cp.n_ctx = n_seq * (max(len(p) for p in prompts) + output_len)
    cp.n_batch = cp.n_ubatch = max(N_BATCH, n_seq)
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = False
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    ctx = lc.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create the context")
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(cp.n_batch, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, seq_id, wants_logits)."""
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def greedy(n_rows: int) -> np.ndarray:
        """Argmax over the last decode's n_rows output rows (in batch order), EOS masked."""
        ptr = ctypes.cast(lc.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
        logits = np.ctypeslib.as_array(ptr, shape=(n_rows, n_vocab))
        logits[:, eos] = -np.inf  # the library's buffer, rewritten by the next decode
        return logits.argmax(axis=1)

    def generate(seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
        lc.llama_memory_clear(memory, True)
        outs: list[list[int]] = [[] for _ in seqs]
        # Prefill: every prompt token, packed across sequences, at most n_batch per decode.
        pending = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(seqs) for pos, t in enumerate(p)]
        for start in range(0, len(pending), cp.n_batch):
            chunk = pending[start:start + cp.n_batch]
            decode(chunk)
            finishing = [seq for _, _, seq, last in chunk if last]
            if finishing:
                for s, tok in zip(finishing, greedy(len(finishing))):
                    outs[s].append(int(tok))
        # Decode: one step per output token, every unfinished sequence in the same batch.
        while True:
            active = [s for s in range(len(seqs)) if len(outs[s]) < max_tokens]
            if not active:
                return outs
            decode([(outs[s][-1], len(seqs[s]) + len(outs[s]) - 1, s, True) for s in active])
            for s, tok in zip(active, greedy(len(active))):
                outs[s].append(int(tok))

    generate([p[:8] for p in prompts[:2]], 4)  # warm-up

    def run() -> int:
        outputs[:] = generate(prompts, output_len)
        return sum(len(o) for o in outputs)

    return "llama.cpp (all sequences batched)", run


engine, run = one_at_a_time() if args.one_at_a_time else batched()
# The build matters more than anything else here: ggml's AMX int8 matmuls are ~3x the AVX-512 ones on W1.
system_info = lc.llama_print_system_info().decode().strip()
amx = "AMX_INT8 = 1" in system_info
timed_run(run, args.out, engine=engine.replace(")", ", AMX)" if amx else ", no AMX)"), threads=threads,
          llama_cpp_version=lc.__version__, system_info=system_info)
if args.tokens_out:
    with open(args.tokens_out, "w") as f:
        json.dump(outputs, f)
