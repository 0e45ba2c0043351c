"""`benchmarks/gpu_check.py --dry-run` runs end to end on CPU, so the one-call GPU check does not
first break on the GPU machine (whose time is short). On CPU its models are tiny, the kernels
interpreted and CUDA graphs off; the sections needing CUDA report that instead of failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_passing_report(tmp_path):
    sections = "env,floor,hf_equivalence,throughput,cuda_graphs,sync_audit,attention_bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGEDLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--sections", sections,
         "--num-prompts", "3", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report_path,) = tmp_path.glob("gpu_check-*.json")
    report = json.loads(report_path.read_text())
    assert list(report["sections"]) == sections.split(",")
    for name, entry in report["sections"].items():
        assert entry["ok"], (name, entry.get("error"), entry.get("traceback"))
    runs = report["sections"]["hf_equivalence"]["result"]["runs"]
    assert {k.split("/")[0] for k in runs} == {"qwen3-tiny", "qwen2-tiny", "llama-tiny"}
    assert report["sections"]["throughput"]["result"]["pagedllm"]["output_tokens"] > 0
    assert proc.stdout.splitlines()[-len(sections.split(",")) - 2].startswith("section")  # the table comes last
