"""Structured outputs: constraints (JSON schema, regex, choice, grammar) compiled by a grammar engine
into per-step token bitmasks that the sampler applies. The engine core owns each request's grammar
state (`manager.py`); the frontend only checks that a constraint compiles (`backend_xgrammar.validate`)."""
