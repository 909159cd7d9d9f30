"""Memory pyarrow freed goes back to the system when released, by either helper."""

import os

import numpy as np
import pyarrow as pa
import pytest

from inference.memory import release_arrow_memory, release_freed_memory


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the RSS from /proc")
@pytest.mark.parametrize("release", [release_arrow_memory, release_freed_memory])
def test_memory_pyarrow_freed_goes_back_to_the_system(release):
    before = rss_mib()
    buffer = pa.allocate_buffer(512 << 20)
    np.frombuffer(buffer, dtype=np.uint8)[:] = 1  # every page touched: 512 MiB resident
    del buffer  # pyarrow's allocator keeps it for reuse: in a 10M-item refresh, GiBs of the peak
    release()
    assert rss_mib() < before + 64
