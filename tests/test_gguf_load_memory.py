"""What a `quantization="gguf"` load leaves resident: at most 1.3x the file plus the KV cache.

The file is a Qwen2 GGUF of a few tens of MB written as llama.cpp writes a Q4_1 one (Q4_1
layers; the tied embedding Q6_K, which a 576-wide row turns into Q8_0, as in SmolLM2's file),
with random blocks and a 49152-token BPE vocabulary (`gguf_utils.write_random_qwen2_gguf`).
Each load runs in a fresh process that first starts and stops the engine on a tiny model, so
the one-off costs of any first engine (libraries, the kernels' module, thread pools) are not
counted as this model's. The float32 path, which holds every weight dequantised, must fail
the same bound, so the bound measures something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_utils import Qwen2Shape, write_random_qwen2_gguf
from test_gguf_loader import write_tiny_gguf

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
KV_BYTES = 16 << 20
PROMPTS = [[3, 70, 101, 200, 17], [260, 5, 9, 44, 88, 120, 31, 7, 250]]

CHILD = """
import gc, json, sys
import torch
torch.set_num_threads(1)
from pagedllm import LLM, SamplingParams, cpu_ops

warm, path, quantization, kernels = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
quantization = None if quantization == "none" else quantization
if not kernels:  # the PyTorch reference path
    cpu_ops.cpu_kernels_available = lambda: False

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

def load(p):
    return LLM(model=p, quantization=quantization, max_model_len=128, kv_cache_memory_bytes=%(kv)d)

load(warm).shutdown()
gc.collect()
before = rss()
llm = load(path)
after = rss()
runner = llm.llm_engine.engine_core.core.model_executor.model_runner
kv = sum(t.numel() * t.element_size() for layer in runner.kv_caches
         for t in (layer if isinstance(layer, (list, tuple)) else [layer]))
outs = llm.generate([{"prompt_token_ids": p} for p in %(prompts)r],
                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print(json.dumps({"rss_delta": after - before, "kv_bytes": kv,
                  "tokens": [list(o.outputs[0].token_ids) for o in outs]}))
llm.shutdown()
""" % {"kv": KV_BYTES, "prompts": PROMPTS}


def load_in_fresh_process(warm: Path, path: Path, quantization: str, kernels: bool = True) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(warm), str(path), quantization, str(int(kernels))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf-load")
    warm = root / "tiny.gguf"
    write_tiny_gguf(warm, "qwen2", True)
    path = root / "qwen2-q4_1.gguf"
    write_random_qwen2_gguf(str(path), Qwen2Shape(hidden=576, layers=4, heads=9, kv_heads=3, intermediate=1536,
                                                  vocab=49152, tie=True), mix="Q4_1")
    return warm, path


def test_gguf_load_stays_within_1_3x_file_plus_kv_cache(files):
    warm, path = files
    file_bytes = path.stat().st_size
    assert 30e6 < file_bytes < 60e6
    gguf = load_in_fresh_process(warm, path, "gguf")
    assert gguf["kv_bytes"] >= KV_BYTES * 0.9
    assert gguf["rss_delta"] <= 1.3 * (file_bytes + gguf["kv_bytes"]), gguf["rss_delta"] / (file_bytes + gguf["kv_bytes"])
    # every weight as float32 is ~4.5x the file: the same bound fails
    float32 = load_in_fresh_process(warm, path, "none")
    assert float32["rss_delta"] > 1.3 * (file_bytes + float32["kv_bytes"])
    # and what was loaded computes what the reference path computes from the same blocks
    reference = load_in_fresh_process(warm, path, "gguf", kernels=False)
    assert gguf["tokens"] == reference["tokens"]
