"""Reasoning parsers on outputs recorded from Qwen3 and DeepSeek-R1: whole outputs split into the
recorded reasoning and content, streams (token by token and in random chunks) reassemble into the
same split, and the token-id checks the engine uses agree with where the text splits."""

from __future__ import annotations

import pytest
from parser_streams import STREAM_MODES, build_tokenizer, stream_steps
from tokenizers import Tokenizer, models

from pagedllm.reasoning import ReasoningParserManager

QWEN3_THINK = ("<think>\nOkay, the user asks for 17 * 24. 17 * 20 = 340 and 17 * 4 = 68, so 408.\n</think>\n\n"
               "17 × 24 = **408**.")
R1 = ("Okay, so I need to find 2 + 2. That's basic: \"2 + 2 = 4\". Let me double-check… yes, 4.\n</think>\n\n"
      "The answer is **4**.")

# (parser, id, output, starts_in_reasoning from the prompt or None, expected reasoning, expected content)
CASES = [
    ("qwen3", "think_then_answer", QWEN3_THINK, None,
     "\nOkay, the user asks for 17 * 24. 17 * 20 = 340 and 17 * 4 = 68, so 408.\n", "\n\n17 × 24 = **408**."),
    ("qwen3", "no_think_markers", "Hello! How can I help you today? 😊", None, None,
     "Hello! How can I help you today? 😊"),
    ("qwen3", "cut_off_while_thinking", "<think>\nThe user wants a poem about the sea. Let me think about rhy", None,
     "\nThe user wants a poem about the sea. Let me think about rhy", None),
    ("qwen3", "empty_think_block", "<think>\n\n</think>\n\nParis.", None, "\n\n", "\n\nParis."),
    ("qwen3", "thinking_2507_prompt_opened_block", "The user greets me; reply briefly.\n</think>\n\nHi there!", True,
     "The user greets me; reply briefly.\n", "\n\nHi there!"),
    ("qwen3", "enable_thinking_false_prompt_closed_block", "Sure, here is a haiku about rain.", False, None,
     "Sure, here is a haiku about rain."),
    ("deepseek_r1", "template_opened_block", R1, None,
     "Okay, so I need to find 2 + 2. That's basic: \"2 + 2 = 4\". Let me double-check… yes, 4.\n", "\n\nThe answer is **4**."),
    ("deepseek_r1", "model_wrote_think", "<think>\nHmm, 3 squared is 9.\n</think>\n\n9", None,
     "\nHmm, 3 squared is 9.\n", "\n\n9"),
    ("deepseek_r1", "never_ends", "Let me consider the cases one at a time. First, n = 1", None,
     "Let me consider the cases one at a time. First, n = 1", None),
    ("deepseek_r1", "ends_at_once", "</think>\n\nDone.", None, None, "\n\nDone."),
]

TOKENIZER = build_tokenizer([c[2] for c in CASES] + ["<|im_start|>assistant\n<think>\n</think>"],
                            markers=["<think>", "</think>", "<|im_start|>"])
THINK, END = TOKENIZER.token_to_id("<think>"), TOKENIZER.token_to_id("</think>")


def _parser(name: str, prompt_opened: bool | None):
    parser = ReasoningParserManager.get(name)(TOKENIZER)
    if prompt_opened is not None:
        prompt = "<|im_start|>assistant\n<think>\n" + ("" if prompt_opened else "\n</think>\n\n")
        parser.adjust_initial_state_from_prompt(TOKENIZER.encode(prompt).ids)
    return parser


IDS = [f"{c[0]}-{c[1]}" for c in CASES]


@pytest.mark.parametrize("name,case,output,prompt_opened,reasoning,content", CASES, ids=IDS)
def test_extract_reasoning_content_splits_the_recorded_output(name, case, output, prompt_opened, reasoning, content):
    assert _parser(name, prompt_opened).extract_reasoning_content(output, None) == (reasoning, content)


@pytest.mark.parametrize("seed", STREAM_MODES, ids=lambda s: "tokens" if s is None else f"chunks{s}")
@pytest.mark.parametrize("name,case,output,prompt_opened,reasoning,content", CASES, ids=IDS)
def test_streaming_reassembles_to_the_non_streaming_split(name, case, output, prompt_opened, reasoning, content, seed):
    parser = _parser(name, prompt_opened)
    streamed_reasoning, streamed_content = "", ""
    for step in stream_steps(TOKENIZER, output, seed):
        delta = parser.extract_reasoning_content_streaming(*step.args())
        if delta is not None:
            assert delta.reasoning_content or delta.content
            assert not delta.tool_calls and delta.role is None
            streamed_reasoning += delta.reasoning_content or ""
            streamed_content += delta.content or ""
    assert (streamed_reasoning or None, streamed_content or None) == (reasoning, content)


@pytest.mark.parametrize("name,case,output,prompt_opened,reasoning,content", CASES, ids=IDS)
def test_token_ids_agree_with_the_text_split(name, case, output, prompt_opened, reasoning, content):
    """The engine asks, on prompt + output ids, whether reasoning has ended (to start a grammar), and
    which output ids are the answer: both must match where the text splits."""
    parser = _parser(name, prompt_opened)
    assert parser.end_token_id == END and parser.start_token_id == THINK
    prompt = TOKENIZER.encode("<|im_start|>assistant\n" + ("<think>\n" if name == "deepseek_r1" or prompt_opened
                                                         else "")).ids
    ids = TOKENIZER.encode(output).ids
    ended_in_output = END in ids
    assert parser.is_reasoning_end(prompt + ids) == ended_in_output
    assert parser.is_reasoning_end(prompt) is False
    content_ids = parser.extract_content_ids(ids)
    if ended_in_output:
        assert TOKENIZER.decode(content_ids, skip_special_tokens=False) == (content or "")
    else:
        assert content_ids == []


def test_qwen3_output_with_only_the_end_token_splits_whole_but_streams_as_content():
    """Without being told the prompt opened the block, a stream cannot know reasoning is under way;
    the whole-output parse still splits at </think>, as vLLM's parser does (documented limit)."""
    output = "The user greets me.\n</think>\n\nHi!"
    parser = _parser("qwen3", None)
    assert parser.extract_reasoning_content(output, None) == ("The user greets me.\n", "\n\nHi!")
    streamed = [parser.extract_reasoning_content_streaming(*s.args()) for s in stream_steps(TOKENIZER, output)]
    assert "".join(d.content or "" for d in streamed if d) == output
    assert not any(d.reasoning_content for d in streamed if d)


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
def test_tokenizer_without_think_tokens_is_refused(name):
    tok = Tokenizer(models.WordLevel({"hello": 0, "<think>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="'</think>'"):
        ReasoningParserManager.get(name)(tok)


def test_registry_names_and_unknown_name():
    assert {"qwen3", "deepseek_r1"} <= set(ReasoningParserManager.names())
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        ReasoningParserManager.get("nope")
