"""keep_freed_heap: freed solver temporaries stay in the heap (glibc), measured in a fresh process."""

import ctypes
import subprocess
import sys

import pytest

from evicpress_sglang.heap import keep_freed_heap
from evicpress_sglang.settings import SettingsError, from_mapping

PROBE = """
import ctypes, sys
import numpy as np
from evicpress_sglang.heap import keep_freed_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
took = keep_freed_heap(int(sys.argv[1]))
for _ in range(3):  # a re-plan's worth of 10 MB temporaries, alive together, then freed
    a = [np.ones(10 * 2**20 // 8) for _ in range(4)]
    del a
print(int(took), libc.mallinfo2().fordblks)
"""


def _probe(keep: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(keep)], capture_output=True, text=True, check=True)
    took, free = out.stdout.split()
    return took == "1", int(free)


def test_freed_temporaries_stay_in_the_heap_only_when_asked():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    took, kept = _probe(256 * 2**20)
    assert took and kept >= 40 * 2**20  # the freed blocks are still the process's
    took, kept = _probe(0)
    assert not took and kept < 30 * 2**20  # glibc's default trimmed what exceeded twice one block


def test_the_setting_takes_sizes_and_refuses_nonsense():
    assert from_mapping({"keep_freed_heap_bytes": "64MiB"}).keep_freed_heap_bytes == 64 * 2**20
    assert from_mapping({}).keep_freed_heap_bytes == 256 * 2**20
    with pytest.raises(SettingsError, match="keep_freed_heap_bytes"):
        from_mapping({"keep_freed_heap_bytes": "lots"})
    assert keep_freed_heap(0) is False
