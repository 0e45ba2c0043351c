"""The models a server answers to: the base model's names and its LoRA adapters (vLLM's
`OpenAIServingModels`).

A request's `model` field picks one: a base name runs the base model, an adapter's name runs that
adapter, anything else is vLLM's 404. Adapters come from `--lora-modules name=path` at start-up
and, where runtime updating is allowed (vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), from
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`. A new adapter is read and checked
against the model once, here (`InputProcessor.check_lora_request`), so a corrupt or mismatched
one is a 400 and never reaches a worker. Each gets a fresh `lora_int_id`: an adapter unloaded and
loaded again under the same name is a new adapter to the engine's caches, and an unloaded one's
copies in the workers' slots and host caches are never used again; they age out of the LRU.
"""

from __future__ import annotations

import itertools
from typing import Optional

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.input_processor import InvalidRequestError
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ModelCard
from pagedllm.lora.request import LoRARequest


def parse_lora_modules(values: Optional[list[str]]) -> list[tuple[str, str]]:
    """`--lora-modules name=path ...` (vLLM's plain form) as (name, path) pairs."""
    modules = []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path pairs, got {value!r}")
        modules.append((name, path))
    return modules


class OpenAIServingModels:
    def __init__(self, engine: AsyncLLM, base_model_names: list[str], model_root: str,
                 lora_modules: list[tuple[str, str]] = ()) -> None:
        self.engine = engine
        self.base_model_names = base_model_names
        self.model_root = model_root
        self.lora_requests: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        for name, path in lora_modules:  # a bad one fails the start, with the reason
            self.add_lora(name, path)

    def resolve(self, model: Optional[str]) -> Optional[LoRARequest]:
        """The adapter `model` names (None: the base model), else vLLM's 404."""
        if model is None or model in self.base_model_names:
            return None
        lora = self.lora_requests.get(model)
        if lora is None:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")
        return lora

    def is_lora(self, model: Optional[str]) -> bool:
        return model in self.lora_requests

    def model_cards(self) -> list[ModelCard]:
        max_len = self.engine.max_model_len
        cards = [ModelCard(id=name, root=self.model_root, max_model_len=max_len) for name in self.base_model_names]
        cards += [ModelCard(id=name, root=lora.lora_path, parent=self.base_model_names[0], max_model_len=max_len)
                  for name, lora in self.lora_requests.items()]
        return cards

    # ----- adding and removing adapters ---------------------------------------------------
    def add_lora(self, name: str, path: str) -> LoRARequest:
        """Check the adapter at `path` against the model and serve it as `name` (ValueError if bad)."""
        if not name or not path:
            raise InvalidRequestError("both lora_name and lora_path must be given", param="lora_name")
        if name in self.lora_requests or name in self.base_model_names:
            raise InvalidRequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        lora = LoRARequest(name, next(self._ids), path)
        self.engine.input_processor.check_lora_request(lora)
        self.lora_requests[name] = lora
        return lora

    def remove_lora(self, name: str) -> None:
        lora = self.lora_requests.pop(name, None)
        if lora is None:
            raise OpenAIError(f"The lora adapter '{name}' cannot be found.", 404, param="lora_name",
                              code="model_not_found")
        self.engine.input_processor.checked_loras.pop(lora.lora_int_id, None)
