"""Logging set-up: one `pagedllm` logger tree whose level comes from the environment.

`PAGEDLLM_LOGGING_LEVEL` (default INFO) mirrors vLLM's `VLLM_LOGGING_LEVEL`, so a user
can silence or open up the engine without touching code.
"""

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
_configured = False


def init_logger(name: str) -> logging.Logger:
    """Return a logger under the `pagedllm` tree, configuring the tree once."""
    global _configured
    if not _configured:
        root = logging.getLogger("pagedllm")
        level = os.environ.get("PAGEDLLM_LOGGING_LEVEL", "INFO").upper()
        root.setLevel(level)
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
            root.addHandler(handler)
        root.propagate = False
        _configured = True
    return logging.getLogger(name)
