"""How many `vpdpbusd` (AVX-512 VNNI: 64 int8 multiply-adds each) one core retires per second, by
number of independent accumulator chains: the ceiling the GGUF tiled GEMM and oneDNN's int8 GEMM
both work under (docs/performance.md, *Why W1 at the default 15 bits ...*). One chain measures the
instruction's latency; 8-12 chains its throughput.

Compiles `benchmarks/native/vnni_peak.cpp` with g++ -O2 -march=native (needs AVX-512 VNNI), runs it
on one core, prints a table and writes JSON under benchmarks/results/.

    python benchmarks/vnni_peak.py
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "vnni_peak")
        subprocess.run(["g++", "-O2", "-march=native", str(HERE / "native" / "vnni_peak.cpp"), "-o", exe], check=True)
        lines = subprocess.run(["taskset", "-c", "0", exe], check=True, capture_output=True, text=True).stdout.split("\n")
    rows = []
    print(f"{'chains':>6} {'G vpdpbusd/s':>13} {'GMAC/s':>8}")
    for line in filter(None, lines):
        chains, rate, _ = line.split()
        rows.append({"chains": int(chains), "g_per_s": float(rate), "gmac_per_s": float(rate) * 64})
        print(f"{chains:>6} {float(rate):13.2f} {float(rate) * 64:8.0f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vnni_peak-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M')}-vm.json"
    out.write_text(json.dumps({"benchmark": "vnni_peak", "load_average": os.getloadavg(), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
