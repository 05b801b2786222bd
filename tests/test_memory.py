"""The console script keeps large freed blocks in the heap (glibc's mallopt), and can be told not to."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
from heedful.memory import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(64 << 20)                     # 64 MiB: mapped on its own under glibc's defaults
info = libc.mallinfo2()
print(info.hblkhd >= 64 << 20)                # True: a separate mapping; False: from the heap
libc.free(p)
print(libc.mallinfo2().arena >= 64 << 20)     # the freed block stays in the heap for the next array
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("opt_out, expected", [("1", ["True", "False", "True"]), ("0", ["False", "True", "False"])])
def test_freed_blocks_stay_in_the_heap_unless_turned_off(opt_out, expected):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "HEEDFUL_KEEP_MEMORY": opt_out}).stdout.split()
    assert out == expected


def test_the_console_script_sets_it(monkeypatch):
    from heedful import cli

    calls = []
    monkeypatch.setattr("heedful.memory.keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(("exit", code)))
    cli.entry()
    assert calls == [1, ("exit", 0)]
