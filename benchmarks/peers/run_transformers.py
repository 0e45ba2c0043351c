"""Hugging Face transformers `generate` on the workload: one left-padded batch, greedy, in the workload's dtype."""

import torch
from common import load_workload, parse_args, timed_run
from transformers import AutoModelForCausalLM

args = parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
prompts, output_len = load_workload(args.workload)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
width = max(len(p) for p in prompts)
pad = 0
input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
with torch.inference_mode():
    model.generate(input_ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=2, do_sample=False)


def run() -> int:
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                             min_new_tokens=output_len, pad_token_id=pad)
    return int((out.shape[1] - width) * out.shape[0])


timed_run(run, args.out, engine=f"transformers generate (padded batch, {args.dtype})", dtype=args.dtype, threads=torch.get_num_threads())
