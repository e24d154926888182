"""The peak resident memory of a stretch of work, as the pipeline records it per stage."""

import time

import numpy as np

from kc.memory import PeakMemory, resident_mib


def test_the_peak_of_a_stretch_counts_memory_freed_before_its_end():
    before = resident_mib()
    with PeakMemory(interval=0.01) as peak:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, every page written
        time.sleep(0.1)  # several samples while it is held
        del block
    assert peak.mib >= before + 150
    assert resident_mib() < peak.mib - 100  # freed again, yet the peak remembers it


def test_a_stretch_that_allocates_nothing_peaks_near_where_it_started():
    with PeakMemory(interval=0.01) as peak:
        start = resident_mib()
        time.sleep(0.05)
    assert abs(peak.mib - start) < 50
