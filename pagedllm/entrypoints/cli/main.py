"""`pagedllm` entry point: dispatch to the subcommands, turning user errors into one clear line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from pagedllm.version import __version__


def build_parser() -> argparse.ArgumentParser:
    from pagedllm.entrypoints.cli.bench import add_bench_parser
    from pagedllm.entrypoints.cli.generate import add_generate_parser
    from pagedllm.entrypoints.cli.serve import add_serve_parser

    parser = argparse.ArgumentParser(prog="pagedllm", description="A vLLM-class LLM engine in readable Python.")
    parser.add_argument("--version", action="version", version=f"pagedllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ValueError, NotImplementedError) as e:
        # Bad input (a missing model, a prompt too long, a feature not there yet, ...) is the user's
        # to fix: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
