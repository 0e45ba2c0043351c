"""`pagedllm generate` and `pagedllm chat`: a real answer in the terminal, streamed as it comes."""

from __future__ import annotations

import argparse
import sys
from typing import Iterator, Optional

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.llm import LLM
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's generation config, else 0 = greedy)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--sampling-seed", "--request-seed", dest="request_seed", type=int, default=None,
                   help="per-request seed (the engine's --seed also makes runs repeatable)")
    g.add_argument("-n", type=int, default=1, help="number of completions")


def sampling_params(llm: LLM, args: argparse.Namespace) -> SamplingParams:
    """The model's defaults, overridden by the flags given; greedy when neither sets a temperature."""
    overrides = dict(llm.llm_engine.default_sampling_overrides)
    overrides.setdefault("temperature", 0.0)
    for flag, field in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                        ("request_seed", "seed")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    overrides["max_tokens"] = args.max_tokens
    overrides["n"] = args.n
    return SamplingParams(**overrides)


def stream(llm: LLM, prompt, params: SamplingParams) -> Iterator[RequestOutput]:
    """Yield delta outputs of one request as the engine produces them."""
    engine = llm.llm_engine
    params = params.clone()
    params.output_kind = RequestOutputKind.DELTA
    request_id = f"cli-{id(params)}"
    engine.add_request(request_id, prompt, params)
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    yield output
    finally:
        engine.abort_request(request_id)


def render_prompt(llm: LLM, messages: list[dict], raw_text: Optional[str]) -> dict:
    """A chat-templated prompt (no second BOS), or the raw text for plain completion."""
    tokenizer = llm.get_tokenizer()
    if raw_text is not None:
        return {"prompt": raw_text}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def print_streamed(llm: LLM, prompt: dict, params: SamplingParams) -> str:
    """Stream one completion to stdout (n == 1), or print n completions as they finish."""
    texts: dict[int, str] = {}
    for output in stream(llm, prompt, params):
        for completion in output.outputs:
            texts[completion.index] = texts.get(completion.index, "") + completion.text
            if params.n == 1:
                sys.stdout.write(completion.text)
                sys.stdout.flush()
    if params.n == 1:
        sys.stdout.write("\n")
    else:
        for index in sorted(texts):
            print(f"--- completion {index} ---\n{texts[index]}")
    sys.stdout.flush()
    return texts.get(0, "")


def run_generate(args: argparse.Namespace) -> int:
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    has_template = bool(getattr(llm.get_tokenizer(), "chat_template", None))
    prompt_text = " ".join(args.prompt)
    raw = prompt_text if (args.raw or not has_template) else None
    prompt = render_prompt(llm, [{"role": "user", "content": prompt_text}], raw)
    print_streamed(llm, prompt, sampling_params(llm, args))
    llm.shutdown()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    if not getattr(llm.get_tokenizer(), "chat_template", None):
        print("error: this model has no chat template; use `pagedllm generate --raw`", file=sys.stderr)
        return 2
    params = sampling_params(llm, args)
    params.n = 1
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("pagedllm chat: type a message; /exit or Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer = print_streamed(llm, render_prompt(llm, messages, None), params)
        messages.append({"role": "assistant", "content": answer})
    llm.shutdown()
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer one prompt and exit",
                              description="Generate a completion for one prompt, streaming it to stdout.")
    p.add_argument("prompt", nargs="+", help="the prompt (words are joined with spaces)")
    p.add_argument("--raw", action="store_true", help="plain completion: do not apply the chat template")
    add_sampling_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_generate)

    c = subparsers.add_parser("chat", help="interactive chat in the terminal",
                              description="Chat with the model; the conversation is kept between turns.")
    c.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_sampling_args(c)
    EngineArgs.add_cli_args(c)
    c.set_defaults(func=run_chat)
