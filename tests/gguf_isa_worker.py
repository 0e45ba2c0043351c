"""Run the GGUF kernels on saved inputs in this process's build (`PAGEDLLM_CPU_ISA`), for
test_gguf_avx2.py: `python gguf_isa_worker.py IN OUT` reads the cases torch.save'd at IN and
saves what the kernels give at OUT. A worker because the ISA is chosen when the library is
built and loaded, once per process."""

from __future__ import annotations

import sys

import torch


def run(cases: dict) -> dict:
    from pagedllm import cpu_ops

    if not cpu_ops.cpu_kernels_available():
        raise SystemExit("the CPU kernels could not be built")
    torch.set_num_threads(1)
    out: dict = {"isa": cpu_ops.cpu_isa(), "vector_isa": torch.ops.pagedllm_cpu.gguf_gemm_vector_isa()}
    # integer cases: given activation bytes, scales of 1 (the integer sums themselves)
    ints = []
    for c in cases["integer"]:
        m, n, nb = c["qa"].shape[0], c["qweight"].shape[0], c["nb"]
        res = torch.empty(m, n)
        cpu_ops.gguf_gemm(res, (c["qa"], torch.ones(m, nb), torch.zeros(m, nb)), c["qweight"], c["scales"], c["mins"],
                          None, c["bits"])
        ints.append(res)
    out["integer"] = ints
    # real blocks: the activations quantised here, then the GEMV and the fused op
    layers = []
    for c in cases["layers"]:
        acts = cpu_ops.quantize_q8_blocks(c["x"], c["act_bits"])
        res = torch.empty(c["x"].shape[0], c["qweight"].shape[0])
        cpu_ops.gguf_gemm(res, acts, c["qweight"], c["scales"], c["mins"], c["bias"], c["bits"])
        fused = torch.ops.pagedllm_cpu.gguf_linear(c["x"], c["qweight"], c["scales"], c["mins"], c["bias"], c["bits"],
                                                   c["act_bits"])
        layers.append({"acts": acts, "gemv": res, "fused": fused})
    out["layers"] = layers
    # activation quantisation alone (bfloat16 inputs, ties): the bytes, scales and sums
    out["quantize"] = [cpu_ops.quantize_q8_blocks(x, bits) for x, bits in cases.get("quantize", [])]
    out["models"] = [greedy_tokens(path) for path in cases["models"]]
    return out


def greedy_tokens(path: str) -> list[list[int]]:
    from test_gguf_quantized import greedy

    return greedy(path, "gguf")[0]


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])  # test_gguf_quantized's greedy()
    torch.save(run(torch.load(sys.argv[1])), sys.argv[2])
