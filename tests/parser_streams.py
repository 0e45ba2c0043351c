"""Helpers for the tool- and reasoning-parser tests: a tiny byte-level BPE tokenizer trained on the
recorded outputs with the format's markers as special tokens, and the (previous, current, delta)
text and token-id steps a server would feed a parser while detokenizing a stream."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MARKERS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<think>", "</think>",
           "<|im_end|>"]


def build_tokenizer(texts: list[str], markers: list[str] = MARKERS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=markers,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@dataclass
class Step:
    previous_text: str
    current_text: str
    delta_text: str
    previous_token_ids: list[int]
    current_token_ids: list[int]
    delta_token_ids: list[int]

    def args(self) -> tuple:
        return (self.previous_text, self.current_text, self.delta_text,
                self.previous_token_ids, self.current_token_ids, self.delta_token_ids)


def stream_steps(tok: Tokenizer, text: str, seed: int | None = None) -> list[Step]:
    """`text` as a detokenizing server streams it: one token per step (seed None) or chunks of 1-7
    tokens (several tokens per step, as with speculative decoding or a slow client). A step whose
    text would end inside a UTF-8 character waits for the next token, as incremental detokenizers do."""
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text, "the test tokenizer must round-trip the output"
    rng = random.Random(seed)
    steps, sent_ids, sent_text, end = [], 0, "", 0
    while end < len(ids):
        end = min(len(ids), end + (1 if seed is None else rng.randint(1, 7)))
        current = tok.decode(ids[:end], skip_special_tokens=False)
        if current.endswith("\ufffd") and end < len(ids):
            continue
        steps.append(Step(sent_text, current, current[len(sent_text):], ids[:sent_ids], ids[:end], ids[sent_ids:end]))
        sent_ids, sent_text = end, current
    return steps


STREAM_MODES = [None, 0, 1, 2]  # token by token, then three seeded chunkings
