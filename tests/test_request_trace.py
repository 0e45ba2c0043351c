"""The request trace (`PAGEDLLM_TRACE=1`, `--trace`): one request followed through the log.

On the tiny Llama with a KV cache too small for its load and a small token budget, so that one
request is admitted with cached blocks, chunked, preempted, resumed and finished; each line must say
so, with the blocks it was given and released, in the order it happened.
"""

from __future__ import annotations

import logging
import re

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.request_trace import TRACE_LOGGER, RequestTracer
from test_cli import pagedllm

PROMPT_IDS = list(range(10, 40))  # 30 tokens


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def of(self, request_id: str) -> list[str]:
        return [line[len(f"req={request_id} "):] for line in self.lines if line.startswith(f"req={request_id} ")]


@pytest.fixture()
def trace_lines():
    handler = Lines()
    logger = logging.getLogger(TRACE_LOGGER)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> None:
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)


def test_trace_follows_one_request_through_the_scheduler(llama_dir, monkeypatch, trace_lines):
    monkeypatch.setenv("PAGEDLLM_TRACE", "1")
    monkeypatch.setenv("PAGEDLLM_LOGGING_LEVEL", "WARNING")  # the trace shows whatever the log level
    llm = LLM(model=llama_dir, max_model_len=96, block_size=8, num_gpu_blocks_override=12,
              max_num_batched_tokens=16)
    try:
        run(llm, [PROMPT_IDS], 2)  # fills the prefix cache with the prompt's 3 full blocks
        run(llm, [PROMPT_IDS, [t + 100 for t in PROMPT_IDS], [t + 200 for t in PROMPT_IDS]], 50)
    finally:
        llm.shutdown()
    first = trace_lines.of("0")
    assert first[0] == "added: prompt 30 tokens, max_tokens 2"
    # A 16-token budget: the 30-token prompt runs as chunks of 16 and 14, each given the blocks it fills.
    assert first[1] == "admitted: 0 cached blocks (0 tokens); chunk of 16 tokens at 0; given [0, 1]"
    assert first[2] == "chunk of 14 tokens at 16; given [2, 3]"
    assert re.fullmatch(r"finished \(length\): 2 tokens generated, 0 preemption\(s\); released \[3, 2, 1, 0\] "
                        r"\(3 stay cached\)", first[-1]), first

    second = trace_lines.of("1")  # the same prompt again: its 3 full blocks come from the prefix cache
    assert second[1].startswith("admitted: 3 cached blocks (24 tokens) shared [0, 1, 2]; chunk of 6 tokens at 24")

    preempted = [rid for rid in ("1", "2", "3") if any(x.startswith("preempted:") for x in trace_lines.of(rid))]
    assert preempted, trace_lines.lines  # 12 blocks cannot hold three requests of 80 tokens
    victim = trace_lines.of(preempted[0])
    kinds = [line.split(":")[0].split(" ")[0] for line in victim]
    assert kinds[:2] == ["added", "admitted"] and kinds[-1] == "finished"
    i = kinds.index("preempted")
    assert "resumed" in kinds[i:]  # it came back after being preempted
    assert re.match(r"preempted: released \[[\d, ]+\].*; \d+ tokens to recompute$", victim[i])
    assert re.search(r"50 tokens generated, [1-9]\d* preemption\(s\)", victim[-1])
    # Every block a request was given is among those it released when it finished or was preempted.
    for rid in ("1", "2", "3"):
        given, released = set(), set()
        for line in trace_lines.of(rid):
            for m in re.finditer(r"given \[([\d, ]*)\]", line):
                given |= {int(b) for b in m.group(1).split(", ") if b}
            for m in re.finditer(r"released \[([\d, ]*)\]", line):
                released |= {int(b) for b in m.group(1).split(", ") if b}
        assert given <= released, (rid, given, released)


def test_no_trace_unless_asked(llama_dir, monkeypatch, trace_lines):
    monkeypatch.delenv("PAGEDLLM_TRACE", raising=False)
    llm = LLM(model=llama_dir, max_model_len=96)
    try:
        # The scheduler's tracer is the base class, whose methods do nothing.
        assert type(llm.llm_engine.engine_core.core.scheduler.tracer) is RequestTracer
        run(llm, [PROMPT_IDS], 4)
    finally:
        llm.shutdown()
    assert trace_lines.lines == []


def test_generate_trace_flag_logs_to_stderr(llama_dir):
    result = pagedllm("generate", "--model", llama_dir, "--max-model-len", "128", "--raw", "--max-tokens", "4",
                      "--trace", "Hello")
    assert result.returncode == 0, result.stderr
    trace = [line for line in result.stderr.splitlines() if "[pagedllm.trace]" in line]
    assert any(" added: prompt " in line for line in trace), result.stderr
    assert any(" finished (length): 4 tokens generated" in line for line in trace), result.stderr
    assert "[pagedllm.trace]" not in result.stdout  # the answer stays clean
