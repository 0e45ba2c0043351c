"""The `pagedllm` command, run as a user runs it: a real process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def pagedllm(*args: str, input: str | None = None, timeout: int = 300,
             log_level: str = "WARNING") -> subprocess.CompletedProcess:
    exe = shutil.which("pagedllm")
    cmd = [exe] if exe else [sys.executable, "-m", "pagedllm.entrypoints.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGEDLLM_LOGGING_LEVEL": log_level}
    return subprocess.run(cmd + list(args), input=input, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("kv_cache_dtype,quantization", [("auto", None), ("bfloat16", None), ("auto", "int8")])
def test_generate_raw_prints_the_greedy_completion(llama_dir, kv_cache_dtype, quantization):
    from pagedllm import LLM, SamplingParams

    llm = LLM(model=llama_dir, max_model_len=128, kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    expected = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)[0].outputs[0].text
    llm.shutdown()
    result = pagedllm("generate", "--model", llama_dir, "--max-model-len", "128", "--raw", "--max-tokens", "8",
                      "--kv-cache-dtype", kv_cache_dtype, *(["--quantization", quantization] if quantization else []),
                      "The capital of France is", log_level="INFO")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    # the flag reached the engine (a tiny model's 8 greedy tokens may be the same either way)
    assert ("quantised to int8" in result.stderr) == (quantization == "int8")
    assert f"of {'bfloat16' if kv_cache_dtype == 'bfloat16' else 'float32'} K/V" in result.stderr


def test_generate_n_prints_each_completion(llama_dir):
    result = pagedllm("generate", "--model", llama_dir, "--max-model-len", "128", "--raw", "--max-tokens", "4",
                      "-n", "2", "--temperature", "1.0", "Hello")
    assert result.returncode == 0, result.stderr
    assert "--- completion 0 ---" in result.stdout and "--- completion 1 ---" in result.stdout


def _file(name: str, content: bytes):
    def make(tmp_path) -> str:
        (tmp_path / name).write_bytes(content)
        return str(tmp_path / name)

    return make


def _unsupported_architecture(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return str(tmp_path)


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda tmp: str(tmp / "missing-model"), "does not exist"),
        (_file("bad.gguf", b"GGUF\x03\x00\x00\x00"), "not a valid GGUF"),
        (_file("junk.gguf", b"hello world"), "not a GGUF"),
        (_unsupported_architecture, "unsupported model architecture"),
    ],
    ids=["missing-path", "truncated-gguf", "not-gguf", "unsupported-architecture"],
)
def test_bad_model_gives_one_clear_error_line(tmp_path, make_model, message):
    result = pagedllm("generate", "--model", make_model(tmp_path), "hi")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_hub_id_without_network_fails_fast_with_a_clear_error():
    result = pagedllm("generate", "--model", "some-org/some-model-that-is-not-here", "hi",
                      timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Hugging Face hub" in result.stderr


@pytest.mark.real_model
def test_generate_answers_with_the_default_model():
    result = pagedllm("generate", "What is the capital of France?", "--max-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.real_model
def test_chat_keeps_the_conversation_and_exits():
    result = pagedllm("chat", "--max-tokens", "32",
                      input="What is the capital of France?\nWhat did I just ask you about?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.count("> ") >= 3  # three prompts shown: two questions and the /exit
