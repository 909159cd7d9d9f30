"""The impression log: exact round trips, rotation, concurrency, a full queue, a failing disk, torn and
malformed files, the reward join, and two servers sharing one directory."""

import builtins
import errno
import json
import os
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from inference import impressions
from inference.impressions import (
    Feedback,
    Impression,
    ImpressionLog,
    logged_slots,
    read_feedback,
    read_impressions,
    read_log,
    read_requests,
)

WAIT_S = 5.0  # generous: another process shares the CPU
DELETED = object()  # a field left out of a record


def impression(request_id: str, **changes) -> Impression:
    served = Impression(request_id=request_id, served_at=1_700_000_000.123456, version="v0007", variant="control",
                        user_id=42,
                        context={"device": "ios", "geo": {"country": "日本"}}, recent_items=(5, 3), k=3,
                        item_ids=(11, 12), sources=("ann", "popular"), scores=(0.75, -1.5e-3),
                        propensities=(1.0, 0.25))
    return replace(served, **changes)


def wait_until(condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the writer thread did not get there in time")
        time.sleep(0.005)


def files(directory: Path, kind: str = "impressions") -> list[Path]:
    return sorted((directory / kind).glob("*.jsonl"))


def write_lines(directory: Path, *lines: str) -> Path:
    path = directory / "impressions" / "20240101T000000.000000-1-000000.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def line(record) -> str:
    return json.dumps(asdict(record)) + "\n"


def test_impressions_and_feedback_round_trip_exactly(tmp_path):
    log = ImpressionLog(tmp_path)
    anonymous = impression("r2", user_id=None, context={}, recent_items=(), k=1, item_ids=(2**40,),
                           sources=("editorial",), scores=(3.0,), propensities=(0.5,))
    click = Feedback(request_id="r1", item_id=12, reward=1.0, received_at=1_700_000_001.5)
    assert all(log.write(r) for r in [impression("r1"), anonymous, click])
    log.close()

    assert (log.written, log.dropped) == (3, 0)
    assert [len(files(tmp_path, kind)) for kind in ("impressions", "feedback")] == [1, 1]
    expected = pd.DataFrame({
        "request_id": ["r1", "r1", "r2"], "served_at": [1_700_000_000.123456] * 3, "version": ["v0007"] * 3,
        "variant": ["control"] * 3, "user_id": pd.array([42, 42, None], dtype="Int64"),
        "context": [{"device": "ios", "geo": {"country": "日本"}}] * 2 + [{}],
        "recent_items": [(5, 3), (5, 3), ()], "k": [3, 3, 1], "position": [0, 1, 0],
        "item_id": [11, 12, 2**40], "source": ["ann", "popular", "editorial"], "score": [0.75, -1.5e-3, 3.0],
        "propensity": [1.0, 0.25, 0.5]})
    pd.testing.assert_frame_equal(read_impressions(tmp_path), expected)
    pd.testing.assert_frame_equal(read_feedback(tmp_path), pd.DataFrame(
        {"request_id": ["r1"], "item_id": [12], "reward": [1.0], "received_at": [1_700_000_001.5]}))


def test_user_ids_past_float_precision_stay_exact_beside_anonymous_requests(tmp_path):
    log = ImpressionLog(tmp_path)
    assert log.write(impression("r1", user_id=2**60 + 1)) and log.write(impression("r2", user_id=None))
    log.close()
    assert read_impressions(tmp_path)["user_id"].tolist() == [2**60 + 1, 2**60 + 1, pd.NA, pd.NA]


def test_a_degenerate_propensity_is_logged_as_null_and_read_as_nan(tmp_path):
    log = ImpressionLog(tmp_path)
    assert log.write(impression("r1", propensities=(float("nan"), 0.5)))
    log.close()
    assert '"propensities":[null,0.5]' in files(tmp_path, "impressions")[0].read_text()
    assert read_impressions(tmp_path)["propensity"].isna().tolist() == [True, False]


def test_the_strategy_a_bandit_drew_is_read_back_per_request(tmp_path):
    log = ImpressionLog(tmp_path)
    for n, (strategy, p) in enumerate([("diverse", 0.25), ("plain", float("nan")), (None, None)]):
        assert log.write(impression(f"r{n}", strategy=strategy, strategy_propensity=p))
    log.close()
    assert '"strategy":"plain","strategy_propensity":null' in files(tmp_path, "impressions")[0].read_text()
    requests = read_requests(tmp_path)
    assert requests["strategy"].tolist() == ["diverse", "plain", None]
    np.testing.assert_array_equal(requests["strategy_propensity"], [0.25, np.nan, np.nan])


def test_empty_or_missing_directory_gives_empty_frames_with_columns(tmp_path):
    (tmp_path / "impressions").mkdir()
    for directory in (tmp_path, tmp_path / "missing"):
        slots, feedback = logged_slots(directory), read_feedback(directory)
        assert (len(slots), len(feedback)) == (0, 0)
        assert list(slots.columns) == [*read_impressions(directory).columns, "reward"]
        assert list(slots.columns)[:5] == ["request_id", "served_at", "version", "variant", "user_id"]
        assert slots["user_id"].dtype == "Int64"
        assert list(feedback.columns) == ["request_id", "item_id", "reward", "received_at"]


def test_rotates_after_rotate_rows_in_write_order(tmp_path):
    log = ImpressionLog(tmp_path, rotate_rows=2)
    for i in range(5):
        log.write(impression(f"r{i}"))
    log.close()

    assert [len(path.read_text().splitlines()) for path in files(tmp_path)] == [2, 2, 1]
    assert read_impressions(tmp_path)["request_id"].unique().tolist() == [f"r{i}" for i in range(5)]


def test_rotates_after_rotate_s(tmp_path):
    log = ImpressionLog(tmp_path, rotate_s=0.05)
    log.write(impression("r0"))
    wait_until(lambda: log.written == 1)
    time.sleep(0.1)
    log.write(impression("r1"))
    log.close()

    assert [path.read_text().count("\n") for path in files(tmp_path)] == [1, 1]
    assert read_impressions(tmp_path)["request_id"].unique().tolist() == ["r0", "r1"]


def test_concurrent_writers_lose_nothing(tmp_path):
    log = ImpressionLog(tmp_path, rotate_rows=97)
    start = threading.Barrier(8)

    def serve(thread: int) -> None:
        start.wait()
        for i in range(250):
            assert log.write(impression(f"t{thread}-{i}"))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()

    assert (log.written, log.dropped) == (2000, 0)
    slots = read_impressions(tmp_path)
    assert sorted(slots["request_id"].unique()) == sorted(f"t{t}-{i}" for t in range(8) for i in range(250))
    for t in range(8):  # one thread's records keep their order
        mine = slots["request_id"][slots["request_id"].str.startswith(f"t{t}-")].unique()
        assert [int(r.split("-")[1]) for r in mine] == list(range(250))


def test_full_queue_returns_false_without_blocking(tmp_path, monkeypatch):
    opening, release = threading.Event(), threading.Event()

    def stuck_open(*args, **kwargs):  # a disk that hangs
        opening.set()
        release.wait(WAIT_S)
        return builtins.open(*args, **kwargs)

    monkeypatch.setattr(impressions, "open", stuck_open, raising=False)
    log = ImpressionLog(tmp_path, queue_size=1)
    assert log.write(impression("r0"))
    assert opening.wait(WAIT_S)  # the writer holds r0, stuck
    assert log.write(impression("r1"))  # the queue's one place
    started = time.monotonic()
    assert not log.write(impression("r2"))
    assert not log.write(Feedback("r0", 11, 1.0, 0.0))
    assert time.monotonic() - started < 0.5
    assert log.dropped == 2
    release.set()
    log.close()

    assert log.written == 2
    assert read_impressions(tmp_path)["request_id"].unique().tolist() == ["r0", "r1"]


def test_failing_open_counts_dropped_and_the_log_keeps_working(tmp_path, monkeypatch, caplog):
    full = True

    def open_on_a_full_disk(*args, **kwargs):
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(*args, **kwargs)

    monkeypatch.setattr(impressions, "open", open_on_a_full_disk, raising=False)
    log = ImpressionLog(tmp_path)
    log.write(impression("lost"))
    wait_until(lambda: log.dropped == 1)
    full = False
    assert log.write(impression("kept"))
    log.close()

    assert (log.written, log.dropped) == (1, 1)
    assert "lost 1 impressions records" in caplog.text
    assert read_impressions(tmp_path)["request_id"].unique().tolist() == ["kept"]


def test_a_write_torn_by_a_full_disk_is_skipped_when_read(tmp_path, monkeypatch, caplog):
    class TornFile:
        """Writes half of what it is given, then reports a full disk."""

        def __init__(self, file):
            self.file = file

        def write(self, text):
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    calls = []

    def open_once_torn(*args, **kwargs):
        calls.append(args)
        file = builtins.open(*args, **kwargs)  # noqa: SIM115 -- the log closes it
        return TornFile(file) if len(calls) == 1 else file

    monkeypatch.setattr(impressions, "open", open_once_torn, raising=False)
    log = ImpressionLog(tmp_path)
    log.write(impression("torn"))
    wait_until(lambda: log.dropped == 1)
    log.write(impression("kept"))
    log.close()

    assert (log.written, log.dropped, len(files(tmp_path))) == (1, 1, 2)
    assert read_impressions(tmp_path)["request_id"].unique().tolist() == ["kept"]
    assert "skipped a torn last line" in caplog.text


@pytest.mark.parametrize("record", [
    impression("r", propensities=(1.0, 0.0)),
    impression("r", scores=(0.5,)),
    impression("r", context={"seen": {1, 2}}),  # not JSON-able
], ids=["zero-propensity", "short-scores", "set-in-context"])
def test_a_record_the_readers_would_refuse_is_dropped_and_the_log_goes_on(tmp_path, record):
    log = ImpressionLog(tmp_path)
    assert log.write(record)
    assert log.write(impression("ok"))
    log.close()

    assert (log.written, log.dropped) == (1, 1)
    assert read_impressions(tmp_path)["request_id"].unique().tolist() == ["ok"]


def test_write_after_close_returns_false_and_close_is_idempotent(tmp_path):
    log = ImpressionLog(tmp_path)
    log.write(impression("r0"))
    log.close()
    log.close()

    assert not log.write(impression("r1"))
    assert (log.written, log.dropped) == (1, 1)


@pytest.mark.parametrize("name, value", [("rotate_rows", 0), ("rotate_s", -1.0), ("queue_size", 0)])
def test_bad_settings_raise(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"{name} = {value}, expected a positive number"):
        ImpressionLog(tmp_path, **{name: value})


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = write_lines(tmp_path, line(impression("r0")), line(impression("r1"))[:40])

    assert read_impressions(tmp_path)["request_id"].unique().tolist() == ["r0"]
    assert f"{path}:2: skipped a torn last line" in caplog.text


def test_malformed_middle_line_raises_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path, line(impression("r0")), line(impression("r1"))[:40] + "\n", line(impression("r2")))

    with pytest.raises(ValueError, match=f"{path}:2: not a JSON line"):
        read_impressions(tmp_path)


@pytest.mark.parametrize("change, message", [
    pytest.param({"propensities": [0.5, 0.0]}, r"propensities = \[0.5, 0.0\], expected a list of numbers in \(0, 1\]",
                 id="zero-propensity"),
    pytest.param({"propensities": [0.5, 1.5]}, r"propensities = \[0.5, 1.5\], expected a list of numbers in \(0, 1\]",
                 id="propensity-above-1"),
    pytest.param({"sources": ["ann"]}, r"slot fields have lengths .*'sources': 1.*expected one length",
                 id="lengths-differ"),
    pytest.param({"item_ids": [11, 11]}, r"item_ids = \[11, 11\] repeat an item", id="repeated-item"),
    pytest.param({"strategy_propensity": 0.0}, r"strategy_propensity = 0.0, expected a number in \(0, 1\]",
                 id="zero-strategy-propensity"),
    pytest.param({"user_id": "42"}, r"user_id = '42', expected an integer or null", id="string-user-id"),
    pytest.param({"k": None}, r"k = None, expected an integer", id="null-k"),
    pytest.param({"scores": [0.5, True]}, r"scores = \[0.5, True\], expected a list of finite numbers",
                 id="bool-score"),
    pytest.param({"version": DELETED, "extra": 1}, r"lacks fields \['version'\] and has unknown fields \['extra'\]",
                 id="missing-and-unknown-fields"),
])
def test_an_invalid_record_raises_naming_file_line_and_field(tmp_path, change, message):
    row = {key: value for key, value in {**asdict(impression("r1")), **change}.items() if value is not DELETED}
    path = write_lines(tmp_path, line(impression("r0")), json.dumps(row) + "\n")

    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        read_impressions(tmp_path)


def test_logged_slots_sums_rewards_and_leaves_out_unmatched_feedback(tmp_path, caplog):
    log = ImpressionLog(tmp_path)
    for record in [impression("r1"), impression("r2", item_ids=(12, 13)),
                   Feedback("r1", 12, 1.0, 1.0), Feedback("r1", 12, 1.0, 2.0),  # two clicks on one slot
                   Feedback("r2", 13, 0.5, 3.0),
                   Feedback("unknown", 12, 1.0, 4.0), Feedback("r1", 99, 1.0, 5.0)]:  # no such slot
        log.write(record)
    log.close()

    slots = logged_slots(tmp_path)
    assert slots[["request_id", "item_id", "position", "reward"]].values.tolist() == [
        ["r1", 11, 0, 0.0], ["r1", 12, 1, 2.0], ["r2", 12, 0, 0.0], ["r2", 13, 1, 0.5]]
    assert "left out 2 feedback records that match no served slot" in caplog.text


def test_two_logs_on_one_directory_never_share_a_file(tmp_path):
    logs = {name: ImpressionLog(tmp_path, rotate_rows=1) for name in ("a", "b")}
    for i in range(50):
        for name, log in logs.items():
            log.write(impression(f"{name}{i}", version=name))
    for log in logs.values():
        log.close()

    contents = [path.read_text().splitlines() for path in files(tmp_path)]
    assert len(contents) == 100
    assert all(len(lines) == 1 for lines in contents)
    served = read_impressions(tmp_path)
    assert sorted(served["request_id"].unique()) == sorted(f"{name}{i}" for name in logs for i in range(50))


def test_read_requests_keeps_requests_that_served_nothing(tmp_path):
    log = ImpressionLog(tmp_path)
    log.write(impression("r1"))
    log.write(impression("r2", item_ids=(), sources=(), scores=(), propensities=(), user_id=None))
    log.close()
    requests = read_requests(tmp_path)
    assert requests["request_id"].tolist() == ["r1", "r2"] and requests["served"].tolist() == [2, 0]
    assert requests["user_id"].tolist()[0] == 42 and pd.isna(requests["user_id"].tolist()[1])
    assert requests["variant"].tolist() == ["control", "control"] and len(logged_slots(tmp_path)) == 2
    both = read_log(tmp_path)  # the same two frames from one read
    pd.testing.assert_frame_equal(both[0], requests)
    pd.testing.assert_frame_equal(both[1], logged_slots(tmp_path))


def test_keep_s_deletes_files_last_written_long_ago_when_a_new_one_starts(tmp_path):
    log = ImpressionLog(tmp_path, rotate_s=0.05, keep_s=600)
    log.write(impression("r0"))
    wait_until(lambda: log.written == 1)
    (own,) = files(tmp_path)
    line = own.read_text()
    old_foreign, recent_foreign = tmp_path / "impressions" / "0-old.jsonl", tmp_path / "impressions" / "1-new.jsonl"
    old_foreign.write_text(line.replace("r0", "old"))
    recent_foreign.write_text(line.replace("r0", "new"))
    long_ago = time.time() - 3600
    for path in (own, old_foreign):
        os.utime(path, (long_ago, long_ago))
    time.sleep(0.1)
    log.write(impression("r1"))  # past rotate_s: a new file, which prunes first
    log.close()
    assert sorted(read_impressions(tmp_path)["request_id"].unique()) == ["new", "r1"]
    with pytest.raises(ValueError, match=r"keep_s = 60, expected more than rotate_s = 3600.0"):
        ImpressionLog(tmp_path, keep_s=60)
