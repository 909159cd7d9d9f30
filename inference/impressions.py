"""The impression log: what each answered request served, and the feedback on it, as JSON lines.

    DIRECTORY/
      impressions/<UTC time>-<pid>-<counter>.jsonl   one `Impression` a line
      feedback/<UTC time>-<pid>-<counter>.jsonl      one `Feedback` a line

Start reading at `ImpressionLog`: the service calls `write` for every answered request and every
feedback event; it never blocks and never raises, and a background thread appends to the files.
File names sort in time order, and each file is created exclusively (mode "x"), so servers
sharing a directory, or restarting, never append to one another's files. After a write error
the writer abandons its file, so a line torn by a crash or a full disk is always the last of its
file, where the readers skip it. Records the readers would refuse are dropped at writing time.

Off-policy evaluation and retraining read the log back with `logged_slots`: one row per served
slot with its propensity and its summed reward.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Impression:
    """One answered request; slot i served ``item_ids[i]`` from ``sources[i]`` with ``scores[i]``."""

    request_id: str
    served_at: float  # epoch seconds
    version: str  # artefact version that answered
    variant: str  # the experiment arm that answered: "control", or an `inference.service.Experiment`'s name
    user_id: int | None
    context: dict[str, object]  # JSON-able request context
    recent_items: tuple[int, ...]
    k: int
    item_ids: tuple[int, ...]  # the M served items, slot 0 first
    sources: tuple[str, ...]
    scores: tuple[float, ...]
    propensities: tuple[float, ...]  # probability of each slot's choice; NaN (logged null): degenerate
    strategy: str | None = None  # the strategy a bandit orderer drew for the request (orderers.py), if any
    strategy_propensity: float | None = None  # its probability under the policy; NaN (logged null): degenerate


@dataclass(frozen=True)
class Feedback:
    """A reward for one served item (a click: 1.0)."""

    request_id: str
    item_id: int
    reward: float
    received_at: float


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _each(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: isinstance(v, list | tuple) and all(valid(x) for x in v)


STRING = ("a string", lambda v: isinstance(v, str))
NUMBER = ("a finite number", _is_number)
# kind (folder) -> field -> (what it must be, check)
FIELDS = {
    "impressions": {
        "request_id": STRING, "served_at": NUMBER, "version": STRING,
        "user_id": ("an integer or null", lambda v: v is None or _is_int(v)),
        "context": ("an object", lambda v: isinstance(v, dict)),
        "recent_items": ("a list of integers", _each(_is_int)), "k": ("an integer", _is_int),
        "item_ids": ("a list of integers", _each(_is_int)),
        "sources": ("a list of strings", _each(lambda x: isinstance(x, str))),
        "scores": ("a list of finite numbers", _each(_is_number)),
        "propensities": ("a list of numbers in (0, 1], null where a deterministic policy chose",
                         _each(lambda x: x is None or (_is_number(x) and 0 < x <= 1))),
        "variant": STRING,
        "strategy": ("a string or null", lambda v: v is None or isinstance(v, str)),
        "strategy_propensity": ("a number in (0, 1], or null (no strategy, or a deterministic policy chose it)",
                                lambda v: v is None or (_is_number(v) and 0 < v <= 1)),
    },
    "feedback": {"request_id": STRING, "item_id": ("an integer", _is_int), "reward": NUMBER, "received_at": NUMBER},
}
SLOT_FIELDS = ("item_ids", "sources", "scores", "propensities")
KINDS = {Impression: "impressions", Feedback: "feedback"}
IMPRESSION_DTYPES = {"request_id": object, "served_at": "float64", "version": object, "variant": object,
                     "user_id": "Int64",
                     "context": object, "recent_items": object, "k": "int64", "position": "int64",
                     "item_id": "int64", "source": object, "score": "float64", "propensity": "float64"}
REQUEST_DTYPES = {"request_id": object, "served_at": "float64", "version": object, "variant": object,
                  "strategy": object, "strategy_propensity": "float64", "user_id": "Int64", "k": "int64",
                  "served": "int64"}
FEEDBACK_DTYPES = {"request_id": object, "item_id": "int64", "reward": "float64", "received_at": "float64"}
_STOP = object()  # queued by close(): the writer thread exits once it has written everything before it
_FILE_NUMBERS = itertools.count()  # shared by every log in this process, so their file names differ


def _null_if_nan(value: float | None) -> float | None:
    return None if value != value else value


def _check(kind: str, row: object) -> None:
    """Raises ValueError naming what is wrong with one record of ``kind``."""
    fields = FIELDS[kind]
    if not isinstance(row, dict):
        raise ValueError(f"{kind} record is {row!r}, expected a JSON object")
    if row.keys() != fields.keys():
        raise ValueError(f"{kind} record lacks fields {sorted(fields.keys() - row.keys())} and has unknown "
                         f"fields {sorted(row.keys() - fields.keys())}, expected exactly {list(fields)}")
    for name, (expected, valid) in fields.items():
        if not valid(row[name]):
            raise ValueError(f"{kind} field {name} = {row[name]!r}, expected {expected}")
    if kind == "impressions":
        lengths = {name: len(row[name]) for name in SLOT_FIELDS}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"slot fields have lengths {lengths}, expected one length")
        if len(set(row["item_ids"])) < len(row["item_ids"]):  # feedback names an item, so it must name one slot
            raise ValueError(f"item_ids = {row['item_ids']!r} repeat an item, expected each item once")


@dataclass
class _File:
    handle: IO[str]
    rows: int
    opened_at: float  # time.monotonic()


class ImpressionLog:
    """Appends records to ``directory`` from a daemon thread, fed by a queue of at most ``queue_size``.

    A kind's file is replaced once it holds ``rotate_rows`` records or a batch arrives ``rotate_s``
    seconds after it was opened. With ``keep_s``, each new file first deletes the kind's files
    (any server's) last written more than ``keep_s`` seconds ago; ``keep_s`` must exceed
    ``rotate_s``, so a file old enough to go is one its writer will replace before writing again.
    Call `close` on shutdown: queued records are lost otherwise.
    """

    def __init__(self, directory: Path, rotate_rows: int = 100_000, rotate_s: float = 3600.0,
                 queue_size: int = 10_000, keep_s: float | None = None) -> None:
        for name, value in {"rotate_rows": rotate_rows, "rotate_s": rotate_s, "queue_size": queue_size}.items():
            if not value > 0:
                raise ValueError(f"{name} = {value!r}, expected a positive number")
        if keep_s is not None and not keep_s > rotate_s:
            raise ValueError(f"keep_s = {keep_s!r}, expected more than rotate_s = {rotate_s!r} seconds")
        self.directory = Path(directory)
        self.rotate_rows, self.rotate_s, self.keep_s = rotate_rows, rotate_s, keep_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # orders write() against close(), guards _dropped
        self._closed = False
        self._dropped = self._written = 0
        self._files: dict[str, _File] = {}
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records refused by a full queue or a closed log, invalid, or lost to a write error."""
        return self._dropped

    @property
    def written(self) -> int:
        """Records written and flushed so far."""
        return self._written

    def write(self, record: Impression | Feedback) -> bool:
        """Queues ``record``; False, and counted in `dropped`, when the queue is full or the log closed."""
        with self._lock:
            if not self._closed:
                with suppress(queue.Full):
                    self._queue.put_nowait(record)
                    return True
            self._dropped += 1
            return False

    def close(self) -> None:
        """Writes everything queued before this call, closes the files and stops the thread; idempotent."""
        with self._lock:
            first, self._closed = not self._closed, True
        if first:
            self._queue.put(_STOP)  # after every accepted record: write() refuses from now on
        self._thread.join()

    def _drop(self, count: int) -> None:
        with self._lock:
            self._dropped += count

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with suppress(queue.Empty):
                while batch[-1] is not _STOP and len(batch) < self._queue.maxsize:
                    batch.append(self._queue.get_nowait())
            lines: dict[str, list[str]] = {kind: [] for kind in FIELDS}
            for record in batch:
                if record is _STOP:
                    break
                try:
                    row = asdict(record)
                    if "propensities" in row:  # JSON has no NaN: a degenerate propensity is logged as null
                        row["propensities"] = [_null_if_nan(p) for p in row["propensities"]]
                        row["strategy_propensity"] = _null_if_nan(row["strategy_propensity"])
                    _check(KINDS[type(record)], row)
                    lines[KINDS[type(record)]].append(json.dumps(row, separators=(",", ":")) + "\n")
                except Exception:  # noqa: BLE001 -- an unloggable record is dropped, never the writer
                    log.exception("impression log %s: dropped a record that cannot be logged", self.directory)
                    self._drop(1)
            for kind, kind_lines in lines.items():
                self._append(kind, kind_lines)
            if batch[-1] is _STOP:
                for kind in list(self._files):
                    self._close(kind)
                return

    def _append(self, kind: str, lines: list[str]) -> None:
        """Writes and flushes ``lines``, starting new files as the rotation limits ask."""
        try:
            while lines:
                file = self._current(kind)
                chunk = lines[: self.rotate_rows - file.rows]
                file.handle.write("".join(chunk))
                file.handle.flush()
                file.rows += len(chunk)
                self._written += len(chunk)
                lines = lines[len(chunk):]
        except OSError:
            log.exception("impression log %s: lost %d %s records", self.directory, len(lines), kind)
            self._drop(len(lines))
            self._close(kind)  # the next batch starts a new file, so a torn line stays the last of its file

    def _current(self, kind: str) -> _File:
        file = self._files.get(kind)
        if file is not None and (file.rows >= self.rotate_rows or time.monotonic() - file.opened_at >= self.rotate_s):
            self._close(kind)
            file = None
        if file is None:
            if self.keep_s is not None:
                self._prune(kind)
            file = self._files[kind] = _File(_create(self.directory / kind), 0, time.monotonic())
        return file

    def _prune(self, kind: str) -> None:
        """Deletes ``kind``'s files last written more than ``keep_s`` seconds ago."""
        oldest = time.time() - self.keep_s
        for path in (self.directory / kind).glob("*.jsonl"):
            with suppress(FileNotFoundError):  # another server pruned it first
                if path.stat().st_mtime < oldest:
                    path.unlink()

    def _close(self, kind: str) -> None:
        file = self._files.pop(kind, None)
        if file is None:  # opening it failed
            return
        try:
            file.handle.close()
        except OSError:
            log.exception("impression log %s: closing %s failed", self.directory, file.handle.name)


def _create(folder: Path) -> IO[str]:
    """A new file in ``folder``, named to sort in time order, created exclusively."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S.%f}-{os.getpid()}-{next(_FILE_NUMBERS):06d}.jsonl"
        with suppress(FileExistsError):  # another host's log with our pid, at the same microsecond
            return open(folder / name, "x", encoding="utf-8")  # noqa: SIM115 -- ImpressionLog._close closes it


def _read(directory: Path, kind: str) -> list[dict]:
    """The records of every ``directory/kind/*.jsonl`` in name order, each checked."""
    rows = []
    for path in sorted((directory / kind).glob("*.jsonl")):
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError as e:
                    if not line.endswith(b"\n"):  # only the last line can lack one: a write cut short
                        log.warning("%s:%d: skipped a torn last line (%d bytes)", path, number, len(line))
                        break
                    raise ValueError(f"{path}:{number}: not a JSON line ({e})") from None
                try:
                    _check(kind, row)
                except ValueError as e:
                    raise ValueError(f"{path}:{number}: {e}") from None
                rows.append(row)
    return rows


def read_impressions(directory: Path) -> pd.DataFrame:
    """One row per served slot, in log order, with the columns of `IMPRESSION_DTYPES`."""
    return _slots(_read(Path(directory), "impressions"))


def read_requests(directory: Path) -> pd.DataFrame:
    """One row per answered request, those that served no item included, in log order:
    request_id, served_at, version, variant, strategy (None without a strategy bandit) and
    strategy_propensity (NaN: none, or degenerate), user_id, k and ``served`` (items)."""
    return _requests(_read(Path(directory), "impressions"))


def read_feedback(directory: Path) -> pd.DataFrame:
    """One row per feedback event, in log order, with the columns of `FEEDBACK_DTYPES`."""
    rows = _read(Path(directory), "feedback")
    return pd.DataFrame(rows, columns=list(FEEDBACK_DTYPES)).astype(FEEDBACK_DTYPES)


def logged_slots(directory: Path) -> pd.DataFrame:
    """`read_impressions` with ``reward``: the summed feedback of each slot's (request_id, item_id), 0.0 without any.

    Feedback that matches no served slot is left out, and its count logged as a warning.
    """
    return _rewarded(read_impressions(directory), directory)


def read_log(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`read_requests` and `logged_slots` of the log, its impressions read once."""
    records = _read(Path(directory), "impressions")
    return _requests(records), _rewarded(_slots(records), directory)


def _slots(records: list[dict]) -> pd.DataFrame:
    slots = [(r["request_id"], r["served_at"], r["version"], r["variant"], r["user_id"], r["context"],
              tuple(r["recent_items"]), r["k"], position, *slot)
             for r in records
             for position, slot in enumerate(zip(*(r[name] for name in SLOT_FIELDS), strict=True))]
    # object first: inferred, user ids beside None would be float64, losing those past 2**53
    return pd.DataFrame(slots, columns=list(IMPRESSION_DTYPES), dtype=object).astype(IMPRESSION_DTYPES)


def _requests(records: list[dict]) -> pd.DataFrame:
    rows = [(r["request_id"], r["served_at"], r["version"], r["variant"], r["strategy"],
             math.nan if r["strategy_propensity"] is None else r["strategy_propensity"], r["user_id"], r["k"],
             len(r["item_ids"]))
            for r in records]
    return pd.DataFrame(rows, columns=list(REQUEST_DTYPES), dtype=object).astype(REQUEST_DTYPES)


def _rewarded(slots: pd.DataFrame, directory: Path) -> pd.DataFrame:
    """``slots`` with the summed rewards of the log's feedback."""
    feedback = read_feedback(directory)
    keys = ["request_id", "item_id"]
    unmatched = int((~pd.MultiIndex.from_frame(feedback[keys]).isin(pd.MultiIndex.from_frame(slots[keys]))).sum())
    if unmatched:
        log.warning("%s: left out %d feedback records that match no served slot", directory, unmatched)
    rewards = feedback.groupby(keys, as_index=False)["reward"].sum()
    slots = slots.merge(rewards, on=keys, how="left")
    slots["reward"] = slots["reward"].fillna(0.0)
    return slots
