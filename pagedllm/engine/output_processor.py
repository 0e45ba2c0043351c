"""The frontend's way out: the engine core's token ids become `RequestOutput`s.

Per user request it keeps the text so far (incremental detokenization, `engine/detokenizer.py`),
the logprobs turned into `Logprob` entries with their text, and the `n` sequences gathered back
into one output. A stop string ends a sequence here, because only the decoded text can tell: the
sequence is finished at once in its output, and `process_outputs` returns its id so the caller
(`LLMEngine`, `AsyncLLM`) ends it in the engine core too, through the core client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pagedllm.engine.core_messages import EngineCoreOutput
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.input_processor import ProcessedRequest
from pagedllm.outputs import CompletionOutput, Logprob, PoolingOutput, PoolingRequestOutput, PromptLogprobs, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.scheduler_output import TokenLogprobs


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
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    child_ids: list[str]
    prompt_logprobs: Optional[PromptLogprobs] = None
    prompt_logprobs_sent: bool = False
    pooling_output: Optional[Any] = None  # a pooling request's vector, once the core sent it

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Sequences a stop string ended here, still running in the engine core until it is told.
    reqs_to_abort: list[str]


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._parent_of: dict[str, tuple[str, int]] = {}  # sequence id -> (request id, index)
        # Token id -> its text alone, for logprobs: 20 candidates per position add up, and the
        # vocabulary bounds this.
        self._token_text: dict[int, str] = {}

    def add_request(self, request: ProcessedRequest) -> None:
        params = request.params
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if isinstance(params, PoolingParams):  # one sequence, nothing to detokenize
            self._parent_of[request.child_ids[0]] = (request.request_id, 0)
            self.requests[request.request_id] = RequestState(request.request_id, request.prompt,
                                                             request.prompt_token_ids, params,
                                                             [SequenceState(0, None)], request.child_ids)
            return
        sequences = []
        for i, child_id in enumerate(request.child_ids):
            detok = None
            if params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens,
                                               params.stop, params.include_stop_str_in_output, params.min_tokens)
            seq = SequenceState(index=i, detokenizer=detok)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            sequences.append(seq)
            self._parent_of[child_id] = (request.request_id, i)
        state = RequestState(request.request_id, request.prompt, request.prompt_token_ids, params, sequences,
                             request.child_ids)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request.request_id] = state

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def parent_of(self, sequence_id: str) -> str:
        """The user request a sequence belongs to (itself when unknown)."""
        entry = self._parent_of.get(sequence_id)
        return entry[0] if entry else sequence_id

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget these requests; returns their sequence ids, for the engine core to end."""
        sequence_ids: list[str] = []
        for request_id in request_ids:
            if request_id in self.requests:
                sequence_ids.extend(self._remove(request_id).child_ids)
        return sequence_ids

    def _remove(self, request_id: str) -> RequestState:
        state = self.requests.pop(request_id)
        for child in state.child_ids:
            self._parent_of.pop(child, None)
        return state

    # ----- one step's outputs -------------------------------------------------------------
    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, None] = {}
        reqs_to_abort: list[str] = []
        for output in outputs:
            entry = self._parent_of.get(output.request_id)
            if entry is None:  # aborted meanwhile (a client that left, a stop string): its tokens are dropped
                continue
            state = self.requests[entry[0]]
            if output.pooling_output is not None:
                state.sequences[0].finish_reason = "stop"
                state.pooling_output = output.pooling_output
                touched[state.request_id] = None
                continue
            if output.new_prompt_logprobs is not None:
                self._add_prompt_logprobs(state, *output.new_prompt_logprobs)
            if not output.new_token_ids:
                continue
            seq = state.sequences[entry[1]]
            if seq.finish_reason is not None:
                continue
            if self._update_sequence(seq, output):
                reqs_to_abort.append(output.request_id)
            touched[state.request_id] = None
        request_outputs = []
        for request_id in touched:
            state = self.requests[request_id]
            output = self._make_output(state)
            if output is not None:
                request_outputs.append(output)
            if state.finished:
                self._remove(request_id)
        return ProcessedOutputs(request_outputs, reqs_to_abort)

    def _update_sequence(self, seq: SequenceState, output: EngineCoreOutput) -> bool:
        """Record a sequence's new tokens; True when a stop string ended it here."""
        new_token_ids = output.new_token_ids
        seq.token_ids.extend(new_token_ids)
        if output.new_logprobs is not None and seq.logprobs is not None:
            seq.logprobs.extend(self._to_logprob_dicts(output.new_logprobs))
            seq.cumulative_logprob += sum(row[0] for row in output.new_logprobs.logprobs)
        stop_string = None
        if seq.detokenizer is not None:
            num_decoded = seq.detokenizer.num_tokens
            stop_string = seq.detokenizer.update(new_token_ids, output.finish_reason == "stop")
        if stop_string is not None:
            # Several tokens can arrive at once (speculative decoding): the ones after the stop string's go.
            del seq.token_ids[len(seq.token_ids) - len(new_token_ids) + seq.detokenizer.num_tokens - num_decoded:]
            if seq.logprobs is not None:
                del seq.logprobs[len(seq.token_ids):]
            seq.finish_reason, seq.stop_reason = "stop", stop_string
            # Ended by its text while the core may still hold it (it ends there only on a stop id).
            return output.finish_reason is None
        if output.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = output.finish_reason, output.stop_reason
        return False

    def _add_prompt_logprobs(self, state: RequestState, first_pos: int, lp: TokenLogprobs) -> None:
        if state.prompt_logprobs is None:
            return
        # Entry p (p >= 1) is prompt token p given tokens 0..p-1; a recompute after a
        # preemption may send positions we already hold.
        for j, entry in enumerate(self._to_logprob_dicts(lp)):
            if first_pos + j + 1 == len(state.prompt_logprobs):
                state.prompt_logprobs.append(entry)

    def _make_output(self, state: RequestState) -> Optional[RequestOutput | PoolingRequestOutput]:
        """The request's output after this step, in its `output_kind` (None: nothing to send yet).

        Text that could still turn out to be the start of a stop string is held back until
        the sequence finishes, so a streamed or cumulative text is never taken back later.
        """
        if state.pooling_output is not None:
            return PoolingRequestOutput(state.request_id, PoolingOutput(state.pooling_output), state.prompt_token_ids,
                                        finished=True, prompt=state.prompt)
        kind = state.params.output_kind
        finished = state.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        outputs = [self._completion(s, delta) for s in state.sequences]
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            prompt_logprobs = list(state.prompt_logprobs)
            state.prompt_logprobs_sent = delta
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
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

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _to_logprob_dicts(self, lp: TokenLogprobs) -> list[dict[int, Logprob]]:
        out = []
        for ids, lps, ranks in zip(lp.token_ids, lp.logprobs, lp.ranks):
            entry: dict[int, Logprob] = {}
            for t, v, r in zip(ids, lps, ranks):
                if t not in entry:
                    entry[t] = Logprob(v, r, self._text_of(t))
            out.append(entry)
        return out
