"""LoRA on the real server: adapters as models (`--lora-modules`, /v1/models with `parent`), picked by the
request's `model` (greedy tokens and logprobs equal PEFT's), vLLM's 404 for an unknown one, and runtime
loading and unloading behind VLLM_ALLOW_RUNTIME_LORA_UPDATING and the API key, where a corrupt or
mismatched adapter is a 400 and the server keeps serving."""

from __future__ import annotations

import math
import os

import httpx
import openai
import pytest
from lora_utils import build_adapter, peft_greedy
from test_server_harness import API_KEY, RemoteServer
from transformers import AutoTokenizer

PROMPT = "The capital of France is"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("server_adapters")
    corrupt = build_adapter(llama_dir, str(root / "corrupt"), seed=9, r=4)
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(64)
    return {
        "all8": build_adapter(llama_dir, str(root / "all8"), seed=1, r=8, alpha=16),
        "qv4": build_adapter(llama_dir, str(root / "qv4"), seed=2, r=4, alpha=8, targets=["q_proj", "v_proj"],
                             use_rslora=True, std=0.4),
        "late": build_adapter(llama_dir, str(root / "late"), seed=3, r=16, alpha=8, targets=["down_proj"]),
        "rank32": build_adapter(llama_dir, str(root / "rank32"), seed=4, r=32, alpha=8, targets=["q_proj"]),
        "corrupt": corrupt,
    }


@pytest.fixture(scope="module")
def server(llama_dir, adapters):
    s = RemoteServer(llama_dir, "--max-model-len", "256", "--served-model-name", "tiny", "--enable-lora",
                     "--max-loras", "2", "--max-lora-rank", "16", "--lora-modules", f"all8={adapters['all8']}",
                     f"qv4={adapters['qv4']}",
                     prelude="import os; os.environ['VLLM_ALLOW_RUNTIME_LORA_UPDATING'] = 'True'")
    yield s
    s.stop()


def check_against_peft(client: openai.OpenAI, llama_dir: str, model: str, adapter: str | None) -> None:
    """Greedy text and each token's logprob (within 1e-4) as PEFT's on transformers."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer.encode(PROMPT)
    expected, ref = peft_greedy(llama_dir, adapter, ids, MAX_TOKENS)
    out = client.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
    assert out.model == model
    choice = out.choices[0]
    # (a byte-level token that ends mid-character is held back at the end, as vLLM does)
    assert choice.text.rstrip("\ufffd") == tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
    assert len(choice.logprobs.token_logprobs) == len(expected)
    for i, (token, logprob) in enumerate(zip(expected, choice.logprobs.token_logprobs)):
        assert math.isclose(logprob, ref[i][token].item(), abs_tol=1e-4), model


def test_adapters_are_models_and_run_like_peft(server, llama_dir, adapters):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "all8", "qv4"}
    assert cards["all8"].parent == "tiny" and cards["all8"].root == adapters["all8"]
    assert getattr(cards["tiny"], "parent", None) is None
    for model, adapter in (("all8", adapters["all8"]), ("qv4", adapters["qv4"]), ("tiny", None)):
        check_against_peft(client, llama_dir, model, adapter)
    chat = client.chat.completions.create(model="qv4", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.model == "qv4" and chat.choices[0].message.content is not None
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'pagedllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=2)
    assert e.value.body["message"] == "The model `no-such-adapter` does not exist." and e.value.body["param"] == "model"


def test_runtime_load_and_unload(server, llama_dir, adapters):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY)
    http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert httpx.post(server.base_url + "/v1/load_lora_adapter",
                      json={"lora_name": "late", "lora_path": adapters["late"]}).status_code == 401
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": adapters["late"]})
    assert r.status_code == 200, r.text
    assert "late" in {m.id for m in client.models.list().data}
    check_against_peft(client, llama_dir, "late", adapters["late"])
    bad = {
        "corrupt": (adapters["corrupt"], "adapter_model.safetensors is corrupt"),
        "rank32": (adapters["rank32"], "above max_lora_rank=16"),
        "missing": ("/nonexistent/adapter", "is not a folder"),
        "all8": (adapters["qv4"], "has already been loaded"),
    }
    for name, (path, message) in bad.items():
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (name, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="Hi", max_tokens=2)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
    # the server kept serving throughout: the first adapter still matches PEFT
    check_against_peft(client, llama_dir, "all8", adapters["all8"])
