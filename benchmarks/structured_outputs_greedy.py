"""Can SmolLM2 finish every schema of tests/json_schemas.py under greedy constrained decoding? xgrammar alone, no engine.

For each schema: a chat prompt asking for one example, then argmax decoding through transformers' model of the
default GGUF with xgrammar's token bitmask applied to the logits at every step, until the grammar accepts EOS
or `--max-tokens` run out. Prints, per schema, the tokens used, whether the JSON ended, whether it is valid
(jsonschema, with formats), and the text; exit status 1 if any schema did not end in a valid instance. This
says whether a schema is finishable in the ~100-150 tokens the corpus aims at, with this tokenizer and
xgrammar's default whitespace handling, before any engine is involved.

    python benchmarks/structured_outputs_greedy.py --max-tokens 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from json_schemas import SCHEMAS  # noqa: E402


def hf_model(path: str) -> torch.nn.Module:
    """transformers' model on transformers' reading of the GGUF, in float32 (as tests/test_real_model.py)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from pagedllm.model_executor.gguf_loader import load_gguf_config

    model = AutoModelForCausalLM.from_config(load_gguf_config(path), dtype=torch.float32)
    model.load_state_dict(load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"], strict=False)
    model.tie_weights()
    return model.eval()


@torch.inference_mode()
def constrained_greedy(model: torch.nn.Module, prompt: list[int], compiled, max_tokens: int) -> tuple[list[int], bool]:
    """Argmax under the grammar's mask; returns the tokens (without EOS) and whether the grammar ended."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits = out.logits[:, -1, :].float()
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        if not matcher.accept_token(token):
            raise RuntimeError(f"the matcher refused token {token}, which its own mask allowed")
        if matcher.is_terminated():
            return tokens, True
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=150)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-any-whitespace", action="store_true",
                   help="compile with any_whitespace=False (xgrammar's compact JSON separators only)")
    args = p.parse_args()

    import jsonschema
    import xgrammar as xgr

    from pagedllm.model_executor.gguf_loader import load_gguf_config, load_gguf_tokenizer
    from pagedllm.model_executor.model_source import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    tokenizer = load_gguf_tokenizer(path)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=load_gguf_config(path).vocab_size)
    compiler = xgr.GrammarCompiler(info)
    model = hf_model(path)
    failed = []
    print(f"{'schema':<19}{'tokens':>7}{'ended':>7}{'valid':>7}{'s':>6}  output")
    for name, schema in SCHEMAS:
        messages = [{"role": "user", "content": f"Give one realistic example of a {name.replace('_', ' ')} as JSON "
                                                f"matching this schema: {json.dumps(schema)}"}]
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer.encode(chat, add_special_tokens=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=not args.no_any_whitespace)
        start = time.perf_counter()
        tokens, ended = constrained_greedy(model, prompt, compiled, args.max_tokens)
        seconds = time.perf_counter() - start
        text = tokenizer.decode(tokens)
        valid = False
        if ended:
            validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
            valid = validator.is_valid(json.loads(text))
        if not (ended and valid):
            failed.append(name)
        print(f"{name:<19}{len(tokens):>7}{'yes' if ended else 'NO':>7}{'yes' if valid else 'NO':>7}{seconds:>6.1f}  "
              f"{json.dumps(text)[:110]}", flush=True)
    print(f"\n{len(SCHEMAS) - len(failed)}/{len(SCHEMAS)} schemas ended in a valid instance within {args.max_tokens} "
          f"tokens" + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
