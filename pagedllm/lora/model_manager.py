"""A worker's adapters: which are in the `max_loras` GPU/CPU slots the layers compute with, and an LRU
of up to `max_cpu_loras` loaded adapters on the host (vLLM's `LRUCacheWorkerLoRAManager`).

Each step the model runner hands over the adapters its requests use (`activate`): an adapter not in
a slot is loaded (from the host cache, else from its PEFT folder), then copied into a slot no
request of this step uses, the least recently used first. The scheduler never admits more distinct
adapters into a step than there are slots (`core/scheduler.py`), so a slot is always found. Every
tensor-parallel rank keeps its own manager and copies its own share of A and B (`lora/layers.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from pagedllm.config import LoRAConfig
from pagedllm.logger import init_logger
from pagedllm.lora.layers import LoRALinearMethod, LoRASlice, slices_of
from pagedllm.lora.peft_loader import LoRAAdapter, load_peft_adapter
from pagedllm.lora.request import LoRARequest

logger = init_logger(__name__)


class LoRAModelManager:
    def __init__(self, model: nn.Module, lora_config: LoRAConfig, hf_config: Any, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = lora_config
        self.hf_config = hf_config
        self.max_loras = lora_config.max_loras
        rank = lora_config.max_lora_rank
        # (layer index, module, its slices) of every layer built with a LoRA method
        self.layers: list[tuple[int, nn.Module, list[LoRASlice]]] = []
        for name, module in model.named_modules():
            if not isinstance(getattr(module, "linear_method", None), LoRALinearMethod):
                continue
            slices = slices_of(module, name)
            if not slices:
                continue
            out_features, in_features = module.weight_shape
            module.lora_a = torch.zeros(self.max_loras, len(slices) * rank, in_features, dtype=dtype, device=device)
            module.lora_b = torch.zeros(out_features, self.max_loras, rank, dtype=dtype, device=device)
            module.lora_slices = tuple((s.out_offset, s.out_size) for s in slices)
            self.layers.append((int(name.split(".")[1]), module, slices))
        self.slots: list[Optional[int]] = [None] * self.max_loras  # the adapter id in each slot
        self.slot_lru: list[int] = list(range(self.max_loras))  # least recently used first
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()

    # ----- per step ---------------------------------------------------------------------
    def activate(self, requests: list[LoRARequest]) -> dict[int, int]:
        """Put every adapter in `requests` into a slot; returns adapter id -> slot."""
        wanted = {r.lora_int_id: r for r in requests}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step uses {len(wanted)} adapters but there are {self.max_loras} slots")
        mapping = {lora_id: self.slots.index(lora_id) for lora_id in wanted if lora_id in self.slots}
        for lora_id, request in wanted.items():
            if lora_id in mapping:
                continue
            slot = next(s for s in self.slot_lru if self.slots[s] not in wanted)
            self._write_slot(slot, self._get_adapter(request))
            self.slots[slot] = lora_id
            mapping[lora_id] = slot
        for slot in mapping.values():  # used this step: most recently used
            self.slot_lru.remove(slot)
            self.slot_lru.append(slot)
        return mapping

    # ----- loading ----------------------------------------------------------------------
    def _get_adapter(self, request: LoRARequest) -> LoRAAdapter:
        adapter = self.cpu_cache.get(request.lora_int_id)
        if adapter is None:
            adapter = load_peft_adapter(request.lora_path, self.hf_config, self.config.max_lora_rank)
            logger.info("Loaded LoRA adapter %s (id %d, rank %d) from %s", request.lora_name, request.lora_int_id,
                        adapter.rank, request.lora_path)
            self.cpu_cache[request.lora_int_id] = adapter
            while len(self.cpu_cache) > self.config.max_cpu_loras:
                evicted, _ = self.cpu_cache.popitem(last=False)
                logger.debug("LoRA adapter %d evicted from the host cache", evicted)
        self.cpu_cache.move_to_end(request.lora_int_id)
        return adapter

    @torch.no_grad()
    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy this rank's share of every A and B into `slot` (B scaled), zeros where the adapter has none.
        A slice's A goes to its own R rows of `lora_a`; its B to its own output rows of `lora_b`."""
        rank = self.config.max_lora_rank
        for layer_index, module, slices in self.layers:
            a_slot, b_slot = module.lora_a[slot], module.lora_b[:, slot]
            a_slot.zero_()
            b_slot.zero_()
            for i, s in enumerate(slices):
                weights = adapter.weights.get((layer_index, s.target))
                if weights is None:
                    continue
                a, b = weights
                r = a.shape[0]
                a_slot[i * rank : i * rank + r].copy_(a[:, s.in_start : s.in_start + s.in_size])
                b_slot[s.out_offset : s.out_offset + s.out_size, :r].copy_(
                    b[s.out_start : s.out_start + s.out_size] * adapter.scaling)
