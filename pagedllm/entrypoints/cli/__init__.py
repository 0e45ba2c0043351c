"""The `pagedllm` command line: generate, chat (and more subcommands as they land)."""
