"""The process's runtime settings: large freed blocks stay in the heap (glibc's mallopt, the console script, can
be turned off); OpenMP threads spin briefly before they sleep (heedful/__init__.py)."""

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
import threading
before = libc.mallinfo2().arena
t = threading.Thread(target=lambda: libc.free(libc.malloc(256 << 20)))
t.start(); t.join()
print(libc.mallinfo2().arena >= before + (192 << 20))   # a thread's block comes from (and stays in) the same heap
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("opt_out, expected", [("1", ["True", "False", "True", "True"]),
                                               ("0", ["False", "True", "False", "False"])])
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


WAIT_PROBE = "import os, heedful, torch; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"


@pytest.mark.parametrize("given, expected", [({}, ["PASSIVE", "10000"]),
                                             ({"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "0"])])
def test_openmp_threads_spin_briefly_before_sleeping_unless_told_otherwise(given, expected):
    """heedful sets the wait before torch loads OpenMP: passive, after GOMP_SPINCOUNT spins; a user's own wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", WAIT_PROBE], capture_output=True, text=True, check=True,
                         env={**env, **given}).stdout.split()
    assert out == expected
