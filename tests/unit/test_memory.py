"""reuse_freed_memory: freed blocks are reused without page faults inside it and handed back after it (that the
numbers do not change is tests/unit/test_sensitivity.py's).

The fault counts come from a fresh interpreter: a long test process's heap layout (what sits at its top) decides
whether freed memory can be trimmed at all, so the contrast is measured where it is known.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qbert_hessian.hessian.memory import _glibc, reuse_freed_memory

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")

# Rounds of 8 tensors of 12 MiB (an attention-score tensor of a BBC batch), each written once, then all freed:
# the second round's minor page faults, in pages of the 96 MiB it writes. In about a third of fresh interpreters,
# whatever the thread count, one tensor of the tuned second round extends the heap (1/8 of its pages fault; CI saw
# it) where a small block has split one freed hole; the heap's high-water mark is reached then and later rounds
# fault nothing. The bound allows two of the eight to do that; the default allocator faults all eight. One
# intra-op thread, as tests run: a pool sized by the machine's cores starts inside the first round, and its small
# blocks once made the default allocator's second round reuse the pages too (the control then fails).
PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from qbert_hessian.hessian.memory import reuse_freed_memory

    torch.set_num_threads(1)  # as the test process runs (tests/conftest.py)

    def round_faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        kept = [torch.empty(3 * 2**20).fill_(1.0) for _ in range(8)]
        del kept
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = 8 * 12 * 2**20 // resource.getpagesize()
    with reuse_freed_memory(sys.argv[1] == "on") as tuned:
        round_faults()
        second = round_faults()
    after_exit = round_faults()
    print(tuned, second / pages, after_exit / pages)
    """
)


def probe(mode: str) -> tuple[bool, float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    tuned, second, after_exit = out.split()
    return tuned == "True", float(second), float(after_exit)


@glibc_only
def test_freed_memory_is_reused_without_faults_and_handed_back_after():
    tuned, second, after_exit = probe("on")
    assert tuned
    assert second < 0.3  # the second round writes into the first round's pages (all but at most two tensors)
    assert after_exit > 0.5  # on leaving, freed memory above the trim threshold goes back to the kernel again
    untuned, second_default, _ = probe("off")
    assert not untuned
    assert second_default > 0.5  # the system's defaults fault the pages in again: what the tuning removes


def test_disabled_is_a_no_op():
    with reuse_freed_memory(False) as tuned:
        assert tuned is False
