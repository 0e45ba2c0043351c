"""pagedllm on a GPU in one call: correctness against transformers, CUDA graphs, throughput, the floor.

No weights are needed: random-weight models are built from configs (tiny Llama, Qwen2 and Qwen3,
a Qwen3-0.6B-shaped model and a small Llama) with a word-level tokenizer covering the whole
vocabulary (`gpu_check_reference.py`, which also drives transformers as the reference).

    python benchmarks/gpu_check.py --quick --output-dir $OUT   # fits one call of < 8 minutes
    python benchmarks/gpu_check.py                             # larger workloads (about 10 minutes)
    python benchmarks/gpu_check.py --dry-run                   # CPU, tiny configs, kernels under TRITON_INTERPRET=1

Sections, in order of priority, each timed and reported on its own (a failure is recorded and
the rest still runs; a section that would overrun `--budget-s` is skipped, one that overruns
is interrupted):
  env              devices and versions
  floor            device-to-device copy bandwidth and bf16 matmul TFLOP/s
  hf_equivalence   greedy output vs transformers, token-exact in fp32 and logprobs close in bf16,
                   with CUDA graphs on and off and with both attention backends
  throughput       nano-vllm's protocol (256 requests, prompt and output lengths uniform in
                   100-1024, ignore EOS) on the Qwen3-0.6B shape, with a step-time breakdown
  cuda_graphs      graph replay vs eager forward: same hidden states, time per decode step
  sync_audit       host syncs per engine step, seen by torch.cuda.set_sync_debug_mode
  profile          torch.profiler summary of decode steps (graph replay and eager)
  transformers     transformers `generate` and continuous-batching `generate_batch` on the same
                   requests as pagedllm's subset run; the speed-up
  kernels          Triton attention vs an SDPA reference at model shapes (fp32, bf16, fp16)
  attention_bench  decode / prefill kernel time against the floor
  gguf_kernels     the Triton GGUF kernel on random blocks of each type against the dequantized matmul,
                   and its batch-1 and 256-row time (`gpu_check_gguf.py`)
  kernel_tests     tests/test_triton_attention.py etc. under pytest, on the real device
Prints a table; writes gpu_check-<date>-<device>.json (after every section, so a run cut short
still leaves its results) and the profile tables to --output-dir ($OUT when set, else
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = time.perf_counter()

# Seconds each section is expected to need (quick mode on an H100-class GPU; guesses until measured).
ESTIMATES = {"env": 5, "floor": 10, "hf_equivalence": 150, "throughput": 120, "cuda_graphs": 30, "sync_audit": 15,
             "profile": 20, "transformers": 100, "kernels": 60, "attention_bench": 20, "gguf_kernels": 60,
             "kernel_tests": 120}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller workloads (transformers on 32 requests, fewer models): one call of < 8 minutes")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, kernels under TRITON_INTERPRET=1")
    p.add_argument("--sections", default=",".join(ESTIMATES))
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting sections after this many seconds (default: 420 with --quick, 560 otherwise)")
    p.add_argument("--num-prompts", type=int, default=None, help="throughput requests (default 256)")
    p.add_argument("--max-len", type=int, default=None, help="prompt and output lengths are uniform in 100..this (1024)")
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="requests given to transformers, and to pagedllm for the same-requests comparison "
                        "(default 64; --quick 32)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--output-dir", default=None, help="where the JSON and profile go (default $OUT, else benchmarks/results)")
    return p.parse_args()


if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    os.environ.setdefault("PAGEDLLM_ATTENTION_BACKEND", "triton")  # the GPU default; CPU would pick torch
sys.path.insert(0, str(ROOT))  # run from a checkout without installing pagedllm (the bare GPU machines)

import torch  # noqa: E402
import gpu_check_gguf  # noqa: E402
import gpu_check_sections as sections  # noqa: E402
from gpu_check_reference import free_memory  # noqa: E402


class SectionTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise SectionTimeout("interrupted: the time budget ran out")


# ----- the two sections that need nothing else ----------------------------------------------------
def section_env(ctx: sections.Context) -> dict:
    import transformers

    from pagedllm.attention.selector import get_attention_backend

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device_name(ctx.device), "dry_run": ctx.args.dry_run, "quick": ctx.args.quick,
            "attention_backend": get_attention_backend(ctx.device).__name__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(cuda=torch.version.cuda, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}")
    return info


def section_floor(ctx: sections.Context) -> dict:
    """What the hardware gives at best: streaming copy bandwidth and dense bf16 matmul throughput."""
    nbytes = (64 << 20) if ctx.args.dry_run else (2 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device).random_()
    dst = torch.empty_like(src)
    t = ctx.timed(lambda: dst.copy_(src), iters=3 if ctx.args.dry_run else 20)
    copy_gbs = 2 * nbytes / t / 1e9  # each byte read once and written once
    del src, dst
    n = 512 if ctx.args.dry_run else 8192
    dtype = torch.float32 if ctx.args.dry_run else torch.bfloat16
    a = torch.randn(n, n, dtype=dtype, device=ctx.device)  # random, never zeros: zeros run faster
    b = torch.randn(n, n, dtype=dtype, device=ctx.device)
    t = ctx.timed(lambda: a @ b, iters=3 if ctx.args.dry_run else 20, warmup=3)
    free_memory(ctx.device)
    return {"copy_GBps": copy_gbs, "copy_bytes": nbytes, "matmul_TFLOPs": 2 * n**3 / t / 1e12,
            "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch.")}


# ----- driver -------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-dryrun-{platform.node()}"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --dry-run to exercise the script on CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 on both sides of the comparison
        torch.backends.cudnn.allow_tf32 = False
    budget = args.budget_s or (420.0 if args.quick or args.dry_run else 560.0)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    stamp = datetime.now(timezone.utc)
    out_dir = Path(args.output_dir or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_check-{stamp:%Y%m%d-%H%M}-{slug(device_name(device))}.json"
    report = {"date": stamp.isoformat(), "device": device_name(device), "args": vars(args), "budget_s": budget,
              "sections": {}}
    ctx = sections.Context(args=args, device=device, log=log, workdir=Path(tempfile.mkdtemp(prefix="pagedllm-gpu-")),
                           out_dir=out_dir, stamp=f"{stamp:%Y%m%d-%H%M}")
    signal.signal(signal.SIGALRM, _on_alarm)

    def run(name: str, fn) -> None:
        if name not in wanted:
            return
        elapsed = time.perf_counter() - START
        if elapsed + ESTIMATES.get(name, 30) > budget:
            report["sections"][name] = {"ok": False, "skipped": f"not started: {elapsed:.0f}s of the {budget:.0f}s "
                                        f"budget used, about {ESTIMATES.get(name, 30)}s needed", "seconds": 0.0}
            log(f"== {name}: skipped (budget)")
            write_report(report, path)
            return
        log(f"== {name}")
        start = time.perf_counter()
        entry: dict = {}
        signal.alarm(max(1, int(budget - elapsed) + 30))  # a little grace past the budget, then interrupt
        try:
            entry["result"] = fn(ctx)
            entry["ok"] = entry["result"].get("passed", True) if isinstance(entry["result"], dict) else True
        except BaseException as e:  # one failed section must not cost the others
            if isinstance(e, KeyboardInterrupt):
                raise
            entry.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log(f"  FAILED: {entry['error']}")
        finally:
            signal.alarm(0)
        free_memory(device)
        entry["seconds"] = time.perf_counter() - start
        report["sections"][name] = entry
        ctx.results[name] = entry.get("result")
        write_report(report, path)

    run("env", section_env)
    run("floor", section_floor)
    for name in ("hf_equivalence", "throughput", "cuda_graphs", "sync_audit", "profile"):
        run(name, getattr(sections, f"section_{name}"))
    ctx.close_engine()
    for name in ("transformers", "kernels", "attention_bench"):
        run(name, getattr(sections, f"section_{name}"))
    run("gguf_kernels", gpu_check_gguf.section_gguf_kernels)
    run("kernel_tests", sections.section_kernel_tests)
    report["total_seconds"] = time.perf_counter() - START
    write_report(report, path)
    print_table(report)
    log(f"wrote {path}")


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def print_table(report: dict) -> None:
    rows = []
    for name, entry in report["sections"].items():
        status = "skipped" if entry.get("skipped") else "ok" if entry.get("ok") else "FAILED"
        headline = gpu_check_gguf.headline if name == "gguf_kernels" else lambda r: sections.headline(name, r)
        text = entry.get("skipped") or (entry.get("error", "") if entry.get("result") is None
                                        else headline(entry["result"]))
        rows.append((name, status, f"{entry['seconds']:.1f}s", text))
    widths = [max(len(r[i]) for r in rows + [("section", "status", "time", "")]) for i in range(3)]
    print()
    print(f"{report['device']}, {report['date'][:16]}, {report.get('total_seconds', 0):.0f} s")
    print(f"{'section':<{widths[0]}}  {'status':<{widths[1]}}  {'time':>{widths[2]}}  result")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")


if __name__ == "__main__":
    main()
