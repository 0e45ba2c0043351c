"""From scheduler updates to `RequestOutput`s: detokenise, match stop strings, gather n>1.

This is where a request's text, logprobs and finish reason are assembled. A stop string
ends a sequence here (the engine then tells the scheduler to free it), because only the
decoded text can tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pagedllm.core.scheduler_output import TokenLogprobs
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class SequenceState:
    index: int
    detokenizer: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # for DELTA outputs


@dataclass
class ParentState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    child_ids: list[str]
    prompt_logprobs: Optional[PromptLogprobs] = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[str, int]] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str]) -> None:
        sequences = []
        for i, child_id in enumerate(child_ids):
            detok = None
            if params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                               params.stop, params.include_stop_str_in_output, params.min_tokens)
            seq = SequenceState(index=i, detokenizer=detok)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            sequences.append(seq)
            self.child_to_parent[child_id] = (request_id, i)
        parent = ParentState(request_id, prompt, prompt_token_ids, params, sequences, list(child_ids))
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[request_id] = parent

    def has_request(self, request_id: str) -> bool:
        return request_id in self.parents

    def child_ids(self, request_id: str) -> list[str]:
        return self.parents[request_id].child_ids

    def parent_of(self, child_id: str) -> str:
        return self.child_to_parent[child_id][0]

    def remove(self, request_id: str) -> None:
        parent = self.parents.pop(request_id)
        for child in parent.child_ids:
            del self.child_to_parent[child]

    def add_prompt_logprobs(self, child_id: str, first_pos: int, lp: TokenLogprobs) -> None:
        parent = self.parents[self.child_to_parent[child_id][0]]
        if parent.prompt_logprobs is None:
            return
        # Entry p (p >= 1) is prompt token p given tokens 0..p-1; a recompute after a
        # preemption may send positions we already hold.
        for j, entry in enumerate(self._to_logprob_dicts(lp)):
            if first_pos + j + 1 == len(parent.prompt_logprobs):
                parent.prompt_logprobs.append(entry)

    def process(self, request: Request, new_token_ids: list[int], logprobs: Optional[TokenLogprobs]) -> Optional[str]:
        """Record a sequence's new tokens. Returns a matched stop string, if any."""
        parent_id, index = self.child_to_parent[request.request_id]
        seq = self.parents[parent_id].sequences[index]
        seq.token_ids.extend(new_token_ids)
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs.extend(self._to_logprob_dicts(logprobs))
            seq.cumulative_logprob += sum(row[0] for row in logprobs.logprobs)
        stop_string = None
        if seq.detokenizer is not None:
            stop_terminated = request.status == RequestStatus.FINISHED_STOPPED
            stop_string = seq.detokenizer.update(new_token_ids, stop_terminated)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif request.is_finished:
            seq.finish_reason, seq.stop_reason = request.status.finish_reason, request.stop_reason
        return stop_string

    def finish_aborted(self, request_id: str) -> None:
        for seq in self.parents[request_id].sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"

    def make_output(self, request_id: str) -> Optional[RequestOutput]:
        """The request's output after this step, in its `output_kind` (None: nothing to send yet).

        Text that could still turn out to be the start of a stop string is held back until
        the sequence finishes, so a streamed or cumulative text is never taken back later.
        """
        parent = self.parents[request_id]
        kind = parent.params.output_kind
        finished = parent.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        outputs = [self._completion(s, delta) for s in parent.sequences]
        prompt_logprobs = None
        if parent.prompt_logprobs is not None and not parent.prompt_logprobs_sent:
            prompt_logprobs = list(parent.prompt_logprobs)
            parent.prompt_logprobs_sent = delta
        return RequestOutput(
            request_id=request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=outputs,
            finished=finished,
        )

    def _completion(self, s: SequenceState, delta: bool) -> CompletionOutput:
        finished = s.finish_reason is not None
        if s.detokenizer is None:
            text = ""
        elif delta:
            text = s.detokenizer.get_delta(finished)
        else:
            text = s.detokenizer.get_text(finished)
        start = s.num_sent_tokens if delta else 0
        s.num_sent_tokens = len(s.token_ids)
        return CompletionOutput(
            index=s.index,
            text=text,
            token_ids=s.token_ids[start:],
            cumulative_logprob=s.cumulative_logprob,
            logprobs=s.logprobs[start:] if s.logprobs is not None else None,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
        )

    def _to_logprob_dicts(self, lp: TokenLogprobs) -> list[dict[int, Logprob]]:
        out = []
        for ids, lps, ranks in zip(lp.token_ids, lp.logprobs, lp.ranks):
            entry: dict[int, Logprob] = {}
            for t, v, r in zip(ids, lps, ranks):
                if t not in entry:
                    entry[t] = Logprob(v, r, self.tokenizer.decode([t]))
            out.append(entry)
        return out
