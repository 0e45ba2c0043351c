"""Train a small EAGLE-1 head for the default model (SmolLM2-135M-Instruct) on this CPU, in minutes.

No trained EAGLE head exists for SmolLM2, and none can be downloaded here, so `benchmarks/spec_decode.py
--eagle-head` needs one made locally. This script does what EAGLE's training does, on a tiny scale:
the target writes answers to a set of chat prompts (greedy, with pagedllm), transformers runs the target
over each whole conversation to get its final hidden states h_p (after the final norm, what pagedllm's
runner hands the head), and the head learns, from (embedding of token p + 1, h_p), to regress h_{p+1}
(smooth L1) and to predict token p + 2 through the target's own LM head (cross-entropy), the two losses
EAGLE-1 uses. The embedding and LM head are the target's and stay frozen (the checkpoint has neither:
pagedllm shares them, as vLLM does). The training prompts are not the benchmark's tasks (`spec_decode.py`'s
TASKS are held out); the loss and the teacher-forced top-1 accuracy on held-out conversations are printed.

Writes an EAGLE-1 checkpoint (config.json + model.safetensors with `fc.weight` and `layers.0.*`) to
`--output` (default: a folder under /tmp; never commit the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

SUBJECTS = ["a bakery", "the water cycle", "a bicycle", "volcanoes", "a chess club", "the moon", "a library",
            "honey bees", "a train station", "rain forests", "a lighthouse", "recycling"]
TEMPLATES = [
    "Write a short paragraph about {s}.",
    "Explain {s} to a child in a few sentences.",
    "Write a Python function that returns a list of three facts about {s}, with a docstring.",
    "Copy this sentence word for word, then write one more sentence: 'People often talk about {s} on weekends.'",
    "List five words related to {s} and explain each in one line.",
]


def training_prompts(n: int) -> list[str]:
    prompts = [t.format(s=s) for s in SUBJECTS for t in TEMPLATES]
    return prompts[:n]


class Head(nn.Module):
    """EAGLE-1's head in plain PyTorch: fc over [embedding, h], one Llama layer without its input norm."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.heads, self.kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = h // self.heads
        self.theta, self.eps = cfg["rope_theta"], cfg["rms_norm_eps"]
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.q_proj = nn.Linear(h, self.heads * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, h, bias=False)
        self.norm = nn.Parameter(torch.ones(h))
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        with torch.no_grad():  # start as "the next hidden state is this one": fc passes h, the layer adds little
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, h:] += torch.eye(h)
            self.o_proj.weight.mul_(0.1)
            self.down_proj.weight.mul_(0.1)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[1], self.d
        inv = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        ang = torch.arange(n)[:, None].float() * inv[None]
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        return x * cos + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * sin

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:  # [n, h] each
        x = self.fc(torch.cat((emb, hidden), -1))
        n = x.shape[0]
        q = self.rope(self.q_proj(x).view(n, self.heads, self.d).transpose(0, 1))
        k = self.rope(self.k_proj(x).view(n, self.kv_heads, self.d).transpose(0, 1))
        v = self.v_proj(x).view(n, self.kv_heads, self.d).transpose(0, 1)
        rep = self.heads // self.kv_heads
        attn = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0),
                                              is_causal=True)
        x = x + self.o_proj(attn.transpose(0, 1).reshape(n, -1))
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def state(self) -> dict[str, torch.Tensor]:
        names = {"fc.weight": self.fc.weight, "layers.0.post_attention_layernorm.weight": self.norm}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"layers.0.self_attn.{proj}.weight"] = getattr(self, proj).weight
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"layers.0.mlp.{proj}.weight"] = getattr(self, proj).weight
        return {k: v.detach().contiguous() for k, v in names.items()}


def target_model():
    """SmolLM2 from the embedded GGUF, dequantised to float32, in transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from pagedllm.model_executor.gguf_loader import load_gguf_config
    from pagedllm.model_executor.model_source import resolve_model

    path = resolve_model(None).path
    config = load_gguf_config(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval().requires_grad_(False), config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="/tmp/smollm2-eagle-head")
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--minutes", type=float, default=8.0, help="training time")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from pagedllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(max_model_len=2048, disable_log_stats=True)
    prompts = training_prompts(args.num_prompts)
    tokenizer = llm.get_tokenizer()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for q in prompts]
    outs = llm.generate([{"prompt_token_ids": c} for c in chats],
                        SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    sequences = [c + list(o.outputs[0].token_ids) for c, o in zip(chats, outs)]
    llm.shutdown()
    print(f"generated {sum(len(o.outputs[0].token_ids) for o in outs)} tokens for {len(prompts)} prompts "
          f"in {time.perf_counter() - start:.0f} s")

    model, config = target_model()
    embedding, lm_head = model.model.embed_tokens.weight, model.lm_head.weight
    data = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor(seq)
            data.append((ids, model.model(input_ids=ids[None]).last_hidden_state[0]))
    print(f"target hidden states for {sum(len(s) for s in sequences)} positions, {time.perf_counter() - start:.0f} s")
    held_out = data[:: 10]
    train = [d for i, d in enumerate(data) if i % 10]

    cfg = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
           "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
           "num_key_value_heads": config.num_key_value_heads, "rms_norm_eps": config.rms_norm_eps,
           "rope_theta": getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 1e4),
           "max_position_embeddings": config.max_position_embeddings}
    head = Head(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)

    def losses(ids: torch.Tensor, h: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        n = len(ids)
        feats = h[: n - 1] + noise * (torch.rand_like(h[: n - 1]) - 0.5)  # EAGLE's feature noise
        out = head(embedding[ids[1:]], feats)  # row p: (token p + 1, h_p)
        reg = F.smooth_l1_loss(out, h[1:])  # regress h_{p+1}
        logits = out[: n - 2] @ lm_head.T  # row p predicts token p + 2
        ce = F.cross_entropy(logits, ids[2:])
        acc = (logits.argmax(-1) == ids[2:]).float().mean().item()
        return reg, ce, acc

    def evaluate() -> str:
        with torch.no_grad():
            r = [losses(ids, h, 0.0) for ids, h in held_out]
        return (f"held-out: regression {sum(x[0].item() for x in r) / len(r):.4f}, cross-entropy "
                f"{sum(x[1].item() for x in r) / len(r):.3f}, top-1 {100 * sum(x[2] for x in r) / len(r):.1f}%")

    print("before training,", evaluate())
    deadline = time.perf_counter() + 60 * args.minutes
    step, epoch = 0, 0
    while time.perf_counter() < deadline:
        epoch += 1
        for i in torch.randperm(len(train)).tolist():
            ids, h = train[i]
            reg, ce, _ = losses(ids, h, noise=0.2)
            loss = reg + 0.1 * ce  # EAGLE-1's weighting
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
            opt.step()
            step += 1
            if time.perf_counter() >= deadline:
                break
        print(f"epoch {epoch} ({step} steps, {time.perf_counter() - start:.0f} s): {evaluate()}")

    os.makedirs(args.output, exist_ok=True)
    save_file(head.state(), os.path.join(args.output, "model.safetensors"))
    head_config = {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
                   "hidden_act": "silu", "torch_dtype": "float32", "bias": False,
                   "tie_word_embeddings": False}
    with open(os.path.join(args.output, "config.json"), "w") as f:
        json.dump(head_config, f, indent=2)
    print(f"wrote {args.output} ({sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters, "
          f"{math.ceil(time.perf_counter() - start)} s in all)")


if __name__ == "__main__":
    main()
