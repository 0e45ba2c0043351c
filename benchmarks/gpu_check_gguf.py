"""`gpu_check.py`'s gguf_kernels section: the Triton GGUF kernel (`triton_gguf_matmul.py`) on the device.

For every GGUF type held in blocks, random but valid blocks are made on the machine the check runs
on (`tests/gguf_utils.random_blocks`: random quant bytes, float16 scales giving weights of about
+-0.03), decoded into the blocked form and moved to the device; nothing is transferred. The kernel's
product is checked against x @ W^T with W the gguf package's own dequantisation of the same bytes
(float64 on the device), in float32 (IEEE products: within 1e-4 of the largest output) and in
bfloat16 (the tile rounded to bfloat16: within 2e-2), at 1, 3, 17 and 256 rows. Then a batch-1 and a
256-row call are timed (bfloat16 activations), beside `F.linear` on the same matrix dequantised to
bfloat16, and the weight bytes read per second at batch 1.

With --dry-run (CPU, TRITON_INTERPRET=1) it checks tiny shapes and times nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # random_blocks, shared with the tests


def section_gguf_kernels(ctx) -> dict:
    from gguf_utils import random_blocks

    from pagedllm.model_executor.layers.quantization import gguf_blocks
    from pagedllm.model_executor.layers.quantization.triton_gguf_matmul import gguf_block_matmul

    dev, dry = ctx.device, ctx.args.dry_run
    n, k = (96, 512) if dry else (4096, 4096)  # 4096 x 4096: a 7B model's attention projection
    rows = (1, 3, 17) if dry else (1, 3, 17, 256)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
    rng = np.random.default_rng(0)
    cases, ok = {}, True
    for type_name in gguf_blocks.KERNEL_TYPES:
        qtype = gguf.GGMLQuantizationType[type_name]
        raw = random_blocks(qtype, n, k, rng)
        w = gguf_blocks.decode(raw, type_name)
        w = gguf_blocks.BlockQuantizedWeight(w.bits, w.qweight.to(dev), w.scales.to(dev), w.mins.to(dev))
        w_ref = torch.from_numpy(gguf.dequantize(raw, qtype).reshape(n, k)).to(dev, torch.float64)
        case: dict = {"bits": w.bits, "sub": w.sub, "weight_MiB": w.nbytes / 2**20,
                      "file_MiB": raw.nbytes / 2**20, "max_rel_err": {}}
        passed = True
        for dtype in tol:
            for m in rows:
                x = torch.randn(m, k, device=dev).to(dtype)
                bias = torch.randn(n, device=dev).to(dtype)
                out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
                gguf_block_matmul(x, w, out, bias)
                expected = x.double() @ w_ref.T + bias.double()
                err = ((out.double() - expected).abs().max() / expected.abs().max()).item()  # NaN fails
                case["max_rel_err"][f"{str(dtype).removeprefix('torch.')}/m{m}"] = err
                passed &= err <= tol[dtype]
        if not dry:
            for m in (1, 256):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
                t = ctx.timed(lambda: gguf_block_matmul(x, w, out), iters=50, warmup=3)
                dense = w_ref.to(torch.bfloat16)
                t_dense = ctx.timed(lambda: F.linear(x, dense), iters=50, warmup=3)
                case[f"us_m{m}"] = t * 1e6
                case[f"dense_bf16_us_m{m}"] = t_dense * 1e6
                if m == 1:
                    case["weight_GBps_m1"] = w.nbytes / t / 1e9
                del dense
        case["passed"] = passed
        ok &= passed
        cases[type_name] = case
        timing = "" if dry else (f", batch 1 {case['us_m1']:.1f} us ({case['weight_GBps_m1']:.0f} GB/s of blocks; "
                                 f"bf16 F.linear {case['dense_bf16_us_m1']:.1f} us), 256 rows {case['us_m256']:.1f} us "
                                 f"(F.linear {case['dense_bf16_us_m256']:.1f} us)")
        worst = max(case["max_rel_err"].values())
        ctx.log(f"  gguf {type_name}: {'ok' if passed else 'FAILED'} (worst rel err {worst:.1e}){timing}")
    return {"passed": ok, "shape": [n, k], "timed": not dry, "cases": cases}


def headline(r: dict) -> str:
    passed = sum(c["passed"] for c in r["cases"].values())
    text = f"{passed}/{len(r['cases'])} types pass"
    if r["timed"]:
        text += "; batch-1 us " + ", ".join(f"{t} {c['us_m1']:.0f}" for t, c in r["cases"].items())
    else:
        text += " (interpreted, not timed)"
    return text
