"""Scratch directories: the ones a dead process of this machine left are removed by the next
`scratch_dir` of their prefix; a live process's, another machine's and other names stay."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd

from inference.refresh.pools import DuckDBOptions, Events
from inference.scratch import scratch_dir


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_dirs_of_dead_processes_go_and_the_rest_stay(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f"rs-{host}+{dead_pid()}-abc_1234"
    live = tmp_path / f"rs-{host}+{os.getpid()}-abc_1234"
    elsewhere = tmp_path / f"rs-other-host+{dead_pid()}-abc_1234"
    unnamed, other = tmp_path / "rs-abc_1234", tmp_path / f"other-{host}+{dead_pid()}-abc_1234"
    for path in (dead, live, elsewhere, unnamed, other):
        (path / "spill").mkdir(parents=True)
    made = scratch_dir("rs-", tmp_path)
    assert made.is_dir() and made.name.startswith(f"rs-{host}+{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (made, live, elsewhere, unnamed, other))


def test_a_killed_process_s_duckdb_spill_is_removed_by_the_next_events(tmp_path):
    events, spill = tmp_path / "events.parquet", tmp_path / "spill"
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}).to_parquet(events)
    code = ("import sys; from inference.refresh.pools import Events, DuckDBOptions; "
            "e = Events(sys.argv[1], options=DuckDBOptions(temp_directory=sys.argv[2])); print(e.spill, flush=True); "
            "sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code, str(events), str(spill)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        left = Path(process.stdout.readline().strip())
        process.kill()
    assert left.is_dir() and left.parent == spill  # SIGKILL: nothing removed it
    with Events(events, options=DuckDBOptions(temp_directory=spill)) as fresh:
        assert list(spill.iterdir()) == [fresh.spill]
    assert list(spill.iterdir()) == []
