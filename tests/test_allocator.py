"""policygrad.allocator: with ``keep`` a freed buffer comes back without page faults; ``system`` leaves glibc as is.

mallopt changes the whole process for good, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from policygrad.allocator import use_allocator

MEGABYTES = 64
PAGES = MEGABYTES // 2 * 2**20 // 4096  # of the second buffer

# a 64 MB tensor written and freed, then a 32 MB one written: the second's minor page faults. Smaller, because torch
# allocates with posix_memalign, which asks malloc for the size plus the alignment: a freed block of exactly the same
# size that is not at the heap's top does not fit it (the heap grows instead, and its new pages fault)
SCRIPT = f"""
import resource, sys, torch
from policygrad.allocator import use_allocator
kept = use_allocator(sys.argv[1])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
first = torch.ones({MEGABYTES} * 2**18)
del first
before = faults()
second = torch.ones({MEGABYTES} * 2**17)
print(kept, faults() - before)
"""


def _second_buffer_faults(allocator: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, allocator], capture_output=True, text=True, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.property
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what keep tunes")
def test_keep_reuses_a_freed_buffer_without_page_faults_and_system_faults_it_in_again():
    kept, faults = _second_buffer_faults("keep")
    assert kept == "True"
    assert faults < PAGES // 20  # the freed memory came back from the heap: a few stray faults at most
    kept, faults = _second_buffer_faults("system")
    assert kept == "False"
    assert faults >= PAGES * 9 // 10  # glibc unmapped the first buffer: every page of the second faults


@pytest.mark.exact
def test_an_unknown_allocator_is_one_line():
    with pytest.raises(ValueError, match=r"allocator must be one of \('keep', 'system'\), got 'jemalloc'"):
        use_allocator("jemalloc")
