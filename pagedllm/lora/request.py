"""`LoRARequest`: which adapter a request runs with, by vLLM's names.

Plain data, so it can ride on a request from the frontend to the engine core and on each step's
`ScheduledRequest` to every worker. `lora_int_id` is what the engine keys on (scheduler slots, the
prefix cache, the workers' adapter caches); `lora_name` is what a server client asks for;
`lora_path` is the PEFT folder a worker loads the weights from the first time it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer (0 is the base model), got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be the folder of a PEFT adapter, got {self.lora_path!r}")

    # vLLM's short spellings
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path
