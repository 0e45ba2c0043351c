"""Images in prompts (LLaVA) against transformers, offline, in chat and through the server.

A tiny random LLaVA checkpoint (CLIP vision tower of 3 layers on 56x56 images: 16 patches, so 16
placeholder rows per image; a 2-layer Llama language model) is built with transformers' own config
classes and image processor. Greedy tokens and logprobs must equal transformers'
`LlavaForConditionalGeneration` on the same weights, for prompts with 0, 1 and 2 images batched
together, with prefill chunks of 10 tokens (so chunks begin and end inside an image's run) and
prefix caching on.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

TOKENS_PER_IMAGE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=1)


def build_llava_checkpoint(path: str) -> str:
    from conftest import build_tokenizer
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(path, extra_tokens=("<image>",))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                       image_size=56, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=TOKENS_PER_IMAGE,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a projector wide enough that the image rows change the text's logits
        model.model.multi_modal_projector.linear_2.weight.normal_(0, 0.3)
    model.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return path


class ImageHost:
    """A local HTTP server of fixed files, recording the paths asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.requests.append(self.path)
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()


def random_image(seed: int, size: tuple[int, int] = (70, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return build_llava_checkpoint(str(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def reference(llava_dir):
    """transformers' greedy tokens and per-step logprobs for (prompt, images)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    processor = AutoImageProcessor.from_pretrained(llava_dir, backend="pil")
    image_id = model.config.image_token_index

    def run(prompt: str, images: list, max_tokens: int = 32) -> tuple[list[int], list[torch.Tensor]]:
        ids = []
        for t in tokenizer(prompt)["input_ids"]:
            ids += [image_id] * TOKENS_PER_IMAGE if t == image_id else [t]
        extra = {}
        if images:
            extra["pixel_values"] = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, **extra)
        return out.sequences[0, len(ids):].tolist(), [torch.log_softmax(s[0].float(), -1) for s in out.logits]

    return run


def assert_matches(output, expected: tuple[list[int], list[torch.Tensor]]) -> None:
    tokens, logprobs = expected
    got = output.outputs[0]
    assert got.token_ids == tokens
    for token, step, ref in zip(tokens, got.logprobs, logprobs):
        assert math.isclose(step[token].logprob, ref[token].item(), abs_tol=1e-4)


CASES = [
    ("Describe <image> in a few words", [random_image(1)]),
    ("Compare <image> with <image> please", [random_image(2), random_image(3, (40, 90))]),
    ("A prompt with no image at all", []),
    ("<image> first", [random_image(4)]),
]


def as_input(prompt: str, images: list):
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt


def test_images_give_the_tokens_and_logprobs_of_transformers(llava_dir, reference):
    llm = LLM(model=llava_dir, max_model_len=256, max_num_batched_tokens=10, max_num_seqs=4)
    try:
        outputs = llm.generate([as_input(p, im) for p, im in CASES], GREEDY, use_tqdm=False)
        for (prompt, images), output in zip(CASES, outputs):
            assert_matches(output, reference(prompt, images))
        assert len(outputs[1].prompt_token_ids) > 2 * TOKENS_PER_IMAGE  # placeholders expanded
    finally:
        llm.shutdown()


def test_blocks_of_an_image_are_shared_only_with_the_same_image(llava_dir, reference):
    """Same text, different images: no KV shared over the image's blocks, each answer its own image's.
    Same image again: its blocks come from the prefix cache and the encoder does not run again."""
    llm = LLM(model=llava_dir, max_model_len=256, block_size=16)
    prompt = "Look at this picture: <image> and tell me what it is about"
    a, b = random_image(10), random_image(11)
    try:
        core = llm.llm_engine.engine_core.core
        runner = core.model_executor.model_runner

        def hit_tokens_of(image: Image.Image):
            before = core.kv_cache_manager.prefix_cache_hits
            output = llm.generate(as_input(prompt, [image]), GREEDY, use_tqdm=False)[0]
            return output, core.kv_cache_manager.prefix_cache_hits - before

        first, _ = hit_tokens_of(a)
        second, second_hits = hit_tokens_of(b)
        assert_matches(first, reference(prompt, [a]))
        assert_matches(second, reference(prompt, [b]))
        image_start = second.prompt_token_ids.index(llm.get_tokenizer().convert_tokens_to_ids("<image>"))
        assert second_hits == image_start // 16 * 16  # the text blocks before the image, nothing after
        third, third_hits = hit_tokens_of(a.copy())
        assert third.outputs[0].token_ids == first.outputs[0].token_ids
        assert third_hits == (len(third.prompt_token_ids) - 1) // 16 * 16  # every full block of the prompt
        # Other text with the same image: no blocks to share, but the encoder's rows are reused.
        encoded = runner.encoder_cache.num_encoded
        other = "Another question entirely, about <image> this time"
        fourth = llm.generate(as_input(other, [a.copy()]), GREEDY, use_tqdm=False)[0]
        assert_matches(fourth, reference(other, [a]))
        assert runner.encoder_cache.num_encoded == encoded
    finally:
        llm.shutdown()


def test_chat_with_image_parts_equals_the_prompt_with_its_image_token(llava_dir):
    llm = LLM(model=llava_dir, max_model_len=256)
    image, other = random_image(20), random_image(21)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in"}, {"type": "image_pil", "image_pil": image},
        {"type": "text", "text": "and in"}, {"type": "image_url", "image_url": {"url": data_url(other)}}]}]
    try:
        chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
        tokenizer = llm.get_tokenizer()
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is in\n<image>\nand in\n<image>"}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        direct = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [image, other]}}, GREEDY,
                              use_tqdm=False)[0]
        assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    finally:
        llm.shutdown()


def test_bad_image_inputs_are_clear_errors(llava_dir, llama_dir, monkeypatch):
    llm = LLM(model=llava_dir, max_model_len=256, limit_mm_per_prompt={"image": 1})
    try:
        bad = [
            ({"prompt": "<image>", "multi_modal_data": {"image": [random_image(1), random_image(2)]}}, "At most 1 image"),
            ({"prompt": "<image> <image>", "multi_modal_data": {"image": random_image(1)}}, "2 image placeholder"),
            ({"prompt": "<image>", "multi_modal_data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}},
             "could not be decoded"),
            ({"prompt": "<image>", "multi_modal_data": {"image": "https://example.com/cat.png"}}, "not allowed"),
            ({"prompt": "<image>", "multi_modal_data": {"video": [1]}}, "other modalities"),
        ]
        for prompt, message in bad:
            with pytest.raises(ValueError, match=message):
                llm.generate(prompt, GREEDY, use_tqdm=False)
        monkeypatch.setenv("PAGEDLLM_MAX_IMAGE_BYTES", "1000")
        with pytest.raises(ValueError, match="larger than the 1000-byte limit"):
            llm.generate({"prompt": "<image>", "multi_modal_data": {"image": data_url(random_image(5))}}, GREEDY,
                         use_tqdm=False)
        # and the engine keeps serving
        assert len(llm.generate({"prompt": "<image>", "multi_modal_data": {"image": random_image(5)}},
                                SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    finally:
        llm.shutdown()
    text_only = LLM(model=llama_dir, max_model_len=128)
    try:
        with pytest.raises(ValueError, match="takes text only"):
            text_only.generate({"prompt": "hi", "multi_modal_data": {"image": random_image(1)}}, use_tqdm=False)
        with pytest.raises(ValueError, match="takes text only"):
            text_only.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": random_image(1)}]}],
                           use_tqdm=False)
    finally:
        text_only.shutdown()


def test_server_chat_with_images(llava_dir):
    """`pagedllm serve` through the openai client: a data-URL image answers as offline, and so does the
    same image fetched from an allowed host (a local HTTP server); a corrupt image, too many images, a
    URL of a host not allowed and a 20 MB image are 400s (a body over the server's 32 MiB limit a 413),
    and the server keeps serving."""
    import httpx
    from test_server_harness import RemoteServer

    offline = LLM(model=llava_dir, max_model_len=256)
    image = random_image(30)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": data_url(image)}}]}]
    expected = offline.chat(messages, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    offline.shutdown()
    png = io.BytesIO()
    image.save(png, format="PNG")
    files = ImageHost({"/cat.png": png.getvalue()})
    server = RemoteServer(llava_dir, "--max-model-len", "256", "--served-model-name", "tiny-llava",
                          "--limit-mm-per-prompt", '{"image": 2}', "--allowed-media-domains", "localhost")
    try:
        client = server.client()
        reply = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=12, temperature=0.0,
                                               extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == expected
        fetched = [{"type": "text", "text": "What is this?"},
                   {"type": "image_url", "image_url": {"url": f"http://localhost:{files.port}/cat.png"}}]
        reply = client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": fetched}],
                                               max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == expected and files.requests == ["/cat.png"]

        def chat_with(parts: list) -> httpx.Response:
            body = {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
            return server.post("/v1/chat/completions", body)

        def image_part(url: str) -> dict:
            return {"type": "image_url", "image_url": {"url": url}}

        big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(20_000_000)).decode()  # a 20 MB image
        cases = [
            ([image_part("data:image/png;base64,bm90IGFuIGltYWdl")], 400, "could not be decoded"),
            ([image_part(data_url(image))] * 3, 400, "At most 2 image"),
            ([image_part(f"http://127.0.0.1:{files.port}/cat.png")], 400, "not allowed"),  # only localhost is
            ([image_part(big)], 400, "larger than"),
            ([image_part("data:image/png;base64," + "A" * (33 << 20))], 413, ""),
        ]
        for parts, status, message in cases:
            response = chat_with(parts)
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert message in error["message"]
            if status == 400:
                assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert chat_with([image_part(data_url(image))]).status_code == 200
    finally:
        code = server.stop()
        files.stop()
    assert code in (0, -15), server.read_log()
    assert files.requests == ["/cat.png"]  # the disallowed URL was never fetched
