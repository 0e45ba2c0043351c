"""pagedllm on the workload: one LLM.generate call over all prompts, in the workload's dtype."""

import os

import torch
from common import load_workload, parse_args, timed_run

from pagedllm import LLM, SamplingParams

args = parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
prompts, output_len = load_workload(args.workload)
llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, compile_fused_ops=args.compile_fused_ops,
          kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization)
params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=4), use_tqdm=False)
if args.compile_fused_ops:  # compile outside the timed run, as vLLM does at start-up
    llm.generate([{"prompt_token_ids": (prompts[0] * 300)[:300]}], SamplingParams(max_tokens=2), use_tqdm=False)
llm.reset_prefix_cache()


def run() -> int:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs)


extras = (", compiled ops" if args.compile_fused_ops else "") + (
    f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype != "auto" else "") + (
    {"int8": ", int8 W8A8", "gguf": ", GGUF blocks"}.get(args.quantization, "")) + (
    f", {os.environ['PAGEDLLM_GGUF_ACT_BITS']}-bit activations"
    if args.quantization == "gguf" and os.environ.get("PAGEDLLM_GGUF_ACT_BITS") else "")
timed_run(run, args.out, repeats=args.repeats, before_each=llm.reset_prefix_cache,
          engine=f"pagedllm ({args.dtype}{extras})", dtype=args.dtype, threads=torch.get_num_threads())
