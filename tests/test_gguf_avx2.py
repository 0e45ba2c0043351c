"""The GGUF kernels as a CPU without AVX-512 runs them: the extension built with
`PAGEDLLM_CPU_ISA=avx2` (AVX2 + FMA, no AVX-512, no AVX-VNNI), in a worker process
(gguf_isa_worker.py), against the PyTorch reference and this process's (native) build.

- integer sums over the full int8 range (255-valued 8-bit weights against -128 activations: where
  vpmaddubsw's int16 pairs would saturate), exact with q8 activations, per 32 and per 16;
- every held GGUF type's random blocks, q8 and 15-bit activations, 1 to 6 rows, k not a multiple of
  128: the reference's output, the activation bytes bit for bit, and the native (AVX-512 VNNI)
  build's output;
- greedy tokens of tiny GGUF models (4-bit; 8-bit with Q6_K layers) equal the reference path's.

In the default suite although the AVX2 build of the extension takes 80-100 s on this 2-core VM
(cached afterwards): it is the only check CI makes of the kernels a CPU without AVX-512 runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from test_gguf_loader import write_tiny_gguf
from test_gguf_quantized import greedy, kernels_or_skip, quantized, to_kernel_order

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.quantization import gguf_blocks

T = gguf.GGMLQuantizationType
WORKER = Path(__file__).with_name("gguf_isa_worker.py")


def integer_cases() -> list[dict]:
    """Random full-range weights and activations; scales 1 or 2 and per-16 mins -1 or -2 keep every
    float sum below 2^24 with q8 (k = 224: 224 * 255 * 128 * 2 < 2^24), so exact."""
    cases = []
    for act_bits in (8, 15):
        for bits, sub in ((4, 32), (8, 32), (8, 16)):
            for k, m in ((160, 6), (224, 1)):
                g = torch.Generator().manual_seed(k + bits + sub + act_bits)
                n, nb, ns = 19, k // 32, k // sub
                q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
                q[0] = 2**bits - 1  # the saturating row: every weight at its top
                top = 127 if act_bits == 8 else 16383
                qa_nat = torch.randint(-top - 1, top + 1, (m, k), dtype=torch.int32, generator=g)
                qa_nat[0, ::2] = -top - 1  # pairs of -128 (q8) / a high plane of -128 (15-bit)
                qa_nat[0, 1::4] = -top - 1
                scales = torch.randint(1, 3, (n, ns), generator=g).float()
                mins = -torch.randint(1, 3, (n, ns), generator=g).float() if sub == 16 else torch.zeros(n, ns)
                expected = (gguf_blocks.block_sums(qa_nat, q, sub).double() * scales.double()[None]).sum(-1)
                if sub == 16:
                    expected += qa_nat.reshape(m, ns, sub).sum(-1).double() @ mins.double().T
                cases.append(dict(act_bits=act_bits, bits=bits, sub=sub, k=k, nb=nb,
                                  qa=to_kernel_order(qa_nat, k, act_bits), qweight=gguf_blocks.pack(q, bits),
                                  scales=scales, mins=mins, expected=expected))
    return cases


def quantize_cases() -> list[tuple[torch.Tensor, int]]:
    """Activation quantisation's own inputs: bfloat16 rows, and float32 rows whose products land on
    exact halves (a block's amax 127 makes d = 1, so x + 0.5 rounds to even)."""
    g = torch.Generator().manual_seed(7)
    ties = torch.randint(-126, 126, (4, 224), generator=g).float() + 0.5
    ties[:, ::32] = 127.0
    rows = (torch.randn(5, 224, generator=g) * torch.linspace(0.05, 4, 224)).to(torch.bfloat16)
    return [(x, bits) for x in (ties, rows) for bits in (8, 15)]


def layer_cases() -> list[dict]:
    cases = []
    for i, type_name in enumerate(gguf_blocks.KERNEL_TYPES):
        k = 768 if type_name.endswith("_K") else 224  # 224: 7 blocks, a last group of 3
        weight = gguf_blocks.decode(quantized(type_name, 41, k, seed=i), type_name)
        for act_bits in (8, 15):
            for rows in (1, 3, 6):
                g = torch.Generator().manual_seed(100 * i + rows + act_bits)
                x = torch.randn(rows, k, generator=g) * torch.linspace(0.05, 4, k)
                cases.append(dict(type_name=type_name, act_bits=act_bits, x=x, qweight=weight.qweight,
                                  scales=weight.scales, mins=weight.mins, bias=torch.randn(41, generator=g),
                                  bits=weight.bits, weight=weight))
    return cases


def tiny_models(tmp_path: Path) -> list[str]:
    four = tmp_path / "tiny-qwen2-q4_1.gguf"
    write_tiny_gguf(four, "qwen2", True, quant_type=T.Q4_1)
    eight = tmp_path / "tiny-llama-q8_0-q6_k.gguf"  # Q6_K's per-16 rows next to Q8_0's 8-bit ones
    write_tiny_gguf(eight, "llama", True, quant_type=T.Q8_0, hidden_size=256, intermediate_size=512,
                    overrides={"attn_v": T.Q6_K, "ffn_down": T.Q6_K})
    return [str(four), str(eight)]


def run_worker(cases: dict, tmp_path: Path, isa: str) -> dict:
    src, dst = tmp_path / "cases.pt", tmp_path / f"out-{isa}.pt"
    torch.save({key: cases[key] for key in ("integer", "layers", "models")}, src)
    env = dict(os.environ, PAGEDLLM_CPU_ISA=isa)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cpu_ops.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(WORKER), str(src), str(dst)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(dst)


def test_avx2_build_matches_the_reference_and_the_native_build(tmp_path, monkeypatch):
    kernels_or_skip()
    layers = [{key: c[key] for key in ("x", "qweight", "scales", "mins", "bias", "bits", "act_bits")}
              for c in layer_cases()]
    cases = dict(integer=integer_cases(), layers=layers, models=tiny_models(tmp_path), quantize=quantize_cases())
    got = run_worker(cases, tmp_path, "avx2")
    assert got["isa"] == "avx2" and got["vector_isa"] == "avx2"

    for c, out in zip(cases["integer"], got["integer"]):
        label = f"{c['bits']}-bit per {c['sub']}, k {c['k']}, {c['act_bits']}-bit activations"
        if c["act_bits"] == 8:
            assert torch.equal(out, c["expected"].float()), label
        else:  # sums up to ~2^27: float32 rounds them; a saturated int16 pair would be off by >= 2^22
            torch.testing.assert_close(out.double(), c["expected"], rtol=0, atol=1e-6 * c["expected"].abs().max().item(),
                                       msg=label)

    native_isa = torch.ops.pagedllm_cpu.gguf_gemm_vector_isa()
    for c, full, out in zip(layer_cases(), cases["layers"], got["layers"]):
        label = f"{c['type_name']}, {c['x'].shape[0]} rows, {c['act_bits']}-bit activations"
        native_acts = cpu_ops.quantize_q8_blocks(c["x"], c["act_bits"])
        assert all(torch.equal(a, b) for a, b in zip(out["acts"], native_acts)), label
        expected = gguf_blocks.block_linear_reference(c["x"], c["weight"], act_bits=c["act_bits"]) + c["bias"]
        torch.testing.assert_close(out["gemv"], expected, rtol=1e-5, atol=1e-4, msg=label)
        torch.testing.assert_close(out["fused"], expected, rtol=1e-5, atol=1e-4, msg=label)
        if native_isa == "avx512-vnni":
            # the same lanes and order of float sums, bar the compiler's unrolling (its split
            # accumulators): equal bit for bit on most types here, within rounding on the rest
            native = torch.empty_like(out["gemv"])
            cpu_ops.gguf_gemm(native, native_acts, full["qweight"], full["scales"], full["mins"], full["bias"],
                              full["bits"])
            torch.testing.assert_close(out["gemv"], native, rtol=1e-5, atol=1e-4, msg=label)

    for (x, bits), out in zip(cases["quantize"], got["quantize"]):
        native = cpu_ops.quantize_q8_blocks(x, bits)
        assert all(torch.equal(a, b) for a, b in zip(out, native)), (x.dtype, bits)

    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    for path, tokens in zip(cases["models"], got["models"]):
        assert tokens == greedy(Path(path), "gguf")[0], path


def test_an_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_ops.CPU_ISA_ENV, "avx1024")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_ISA"):
        cpu_ops.cpu_isa()
    monkeypatch.setenv(cpu_ops.CPU_ISA_ENV, " AVX2 ")
    assert cpu_ops.cpu_isa() == "avx2"
