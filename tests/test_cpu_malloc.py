"""`worker/cpu_malloc.py`: after the tuning, a large CPU tensor comes from the heap, not from a
fresh mmap (whose pages fault in and are zeroed on every allocation), and its memory is reused.

Each case runs in a fresh interpreter, since the settings are process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pagedllm.worker import cpu_malloc

PROBE = r"""
import ctypes, json, sys
import torch
from pagedllm.worker.cpu_malloc import keep_freed_memory_in_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory_in_heap() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd  # what was mapped before (during imports)
x = torch.ones(64 << 18)  # 64 MiB of float32, above glibc's largest mmap threshold
during = libc.mallinfo2().hblkhd
del x

def churn(n):  # n more such tensors, one at a time, as a run of steps makes them
    for _ in range(n):
        y = torch.ones(64 << 18)
        del y

churn(5)  # a small allocation landing beside a freed block can cost one more block, once
heap = libc.mallinfo2().arena
churn(20)
grown = libc.mallinfo2().arena - heap
print(json.dumps({"tuned": tuned, "mmapped": during - before, "reused": grown < 1 << 20}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(cpu_malloc._glibc() is None, reason="the tuning is for glibc's malloc")


def test_large_tensors_come_from_the_heap_after_tuning():
    plain = probe("plain")
    assert plain["mmapped"] >= 64 << 20  # glibc's default: its own mmap, unmapped on free
    tuned = probe("tuned")
    assert tuned["tuned"] is True
    assert tuned["mmapped"] == 0  # served from the heap
    assert tuned["reused"]  # and freed memory is used again: the heap stops growing


def test_tuning_can_be_switched_off():
    env = dict(os.environ, **{cpu_malloc.CPU_MALLOC_TUNING_ENV: "0"})
    result = probe("tuned", env)
    assert result["tuned"] is False and result["mmapped"] >= 64 << 20


TRIM_PROBE = r"""
import json
import torch
from pagedllm.worker.cpu_malloc import keep_freed_memory_in_heap, release_free_heap

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS"))

keep_freed_memory_in_heap()
tensors = [torch.ones(16 << 18) for _ in range(16)]  # 256 MiB in 16 MiB pieces, as loading makes them
keep = torch.ones(1 << 10)  # allocated last, so the freed memory lies below live data, not only at the top
del tensors
held = rss()
released = release_free_heap()
print(json.dumps({"released": released, "dropped": held - rss()}))
"""


def test_free_heap_goes_back_to_the_os_once_asked():
    """The tuning keeps freed memory resident; malloc_trim after loading hands it back anyway."""
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["released"] is True
    assert result["dropped"] >= 200 << 20  # most of the 256 MiB
