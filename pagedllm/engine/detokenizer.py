"""Incremental detokenisation and stop strings, one instance per sequence.

Text grows token by token through `tokenizers`' `DecodeStream`, primed with the end of the
prompt so the first generated token gets its leading space right, and which holds back a
token until it completes a valid UTF-8 character, so no multi-byte character is ever cut.
Stop strings are matched on the decoded text, across token boundaries.
"""

from __future__ import annotations

from typing import Optional

from tokenizers.decoders import DecodeStream

# Enough prompt context for the decoder to know about spaces and merges before the output.
_PRIME_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool, min_tokens: int = 0) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=prompt_token_ids[-_PRIME_TOKENS:], skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        # While streaming, hold back text that could still become the start of a stop string.
        self._holdback = max((len(s) for s in stop), default=1) - 1 if not include_stop_str_in_output else 0
        self.min_tokens = min_tokens
        self.num_tokens = 0
        self.output_text = ""
        self._sent = 0

    def update(self, token_ids: list[int], stop_terminated: bool) -> Optional[str]:
        """Append tokens; return the matched stop string if one appeared (text is then cut)."""
        if stop_terminated and not self.include_stop_str_in_output:
            token_ids = token_ids[:-1]  # a stop token id is kept in token_ids, not in text
        for token_id in token_ids:
            before = len(self.output_text)
            self.num_tokens += 1
            piece = self._stream.step(self._backend, token_id)
            if piece:
                self.output_text += piece
            # Stop strings, like stop ids, count only after min_tokens (a match may straddle it).
            if self.stop and len(self.output_text) > before and self.num_tokens > self.min_tokens:
                matched = self._check_stop(before)
                if matched is not None:
                    return matched
        return None

    def _check_stop(self, new_from: int) -> Optional[str]:
        found = [
            (idx, stop)
            for stop in self.stop
            if (idx := self.output_text.find(stop, max(0, new_from - len(stop) + 1))) != -1
        ]
        if not found:
            return None
        idx, stop = min(found, key=lambda f: f[0])  # the earliest match wins
        end = idx + len(stop) if self.include_stop_str_in_output else idx
        self.output_text = self.output_text[:end]
        return stop

    def get_text(self, finished: bool) -> str:
        """All text so far, minus a possible stop-string start unless finished."""
        return self.output_text if finished else self.output_text[: len(self.output_text) - self._holdback]

    def get_delta(self, finished: bool) -> str:
        """New text since the last call; stop-string candidates are held back until finished."""
        end = len(self.output_text) if finished else max(self._sent, len(self.output_text) - self._holdback)
        delta = self.output_text[self._sent : end]
        self._sent = end
        return delta
