"""annify.cpu.keep_freed_memory: large freed blocks stay in the process instead of going back to the system."""

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# the probe reads mallinfo2, new in glibc 2.33
MALLINFO2 = GLIBC and tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2]) >= (2, 33)

# Run in a child process: the setting is process-wide and cannot be undone, and the test measures
# the C library's default first. mallinfo2 (glibc >= 2.33): hblkhd = bytes held in mmapped blocks,
# arena = bytes of the brk heap.
PROBE = r"""
import ctypes, torch
from annify.cpu import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
big = 256 << 20  # above glibc's largest mmap threshold (32 MiB), like a 64x256x56x56 activation

def held():
    t = torch.ones(big, dtype=torch.uint8)
    during = libc.mallinfo2()
    del t
    after = libc.mallinfo2()
    return during.hblkhd >= big, after.arena >= big

print(held())
print(keep_freed_memory())
print(held())
"""


@pytest.mark.skipif(not MALLINFO2, reason="the probe needs glibc >= 2.33 (mallinfo2)")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, took, kept = out.stdout.split("\n")[:3]
    assert default == "(True, False)"  # the default: mmapped while alive, returned to the system on free
    assert took == "True"
    assert kept == "(False, True)"  # kept: from the heap, still held by the process after free


def test_keep_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    from annify import cpu

    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(cpu, "_kept", False)
    assert cpu.keep_freed_memory() is False
