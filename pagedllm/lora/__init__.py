"""Multi-LoRA serving: many PEFT adapters of one base model, batched in the same step (docs/lora.md)."""
