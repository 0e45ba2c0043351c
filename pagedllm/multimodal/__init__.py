"""Images in prompts: reading them, preparing them for a vision encoder, and placing them in the prompt.

vLLM's `vllm/multimodal/` in small: `image.py` turns what a user sends (a PIL image, a data URL, an
allowed http(s) URL) into a checked image; `processing.py` runs the checkpoint's own image processor
(transformers', with its PIL backend: no torchvision needed) and expands each image placeholder of
the prompt into the run of tokens the model's encoder output fills; `inputs.py` is what travels
with a request to the engine core and the model runner.
"""
