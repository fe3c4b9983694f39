"""The mainlog on a real full disk (a 2 MiB tmpfs): one log line for the failure, bounded memory,
and after recovery every record kept is written exactly once, whole and in order."""

from __future__ import annotations

import logging

from fastrelay.mainlog import MainLog
from fastrelay.message import Envelope, Recipient


def _fill(fs) -> None:
    """Take every free byte of the filesystem (big writes, then single bytes)."""
    with open(fs / "filler", "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


ENV = Envelope("from@src.test", [Recipient("x@dst.test")], "dst.test", msgid="ABC.node")


def _records(ml: MainLog, first: int, n: int) -> None:
    for i in range(first, first + n):
        # No running loop here: each record is flushed at once, so each one meets the full disk.
        ml.outcome("D", ENV, f"r{i}@dst.test", 1234, "127.0.0.2:25", "250 2.0.0 ok " + "x" * 60)


def _lines(path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines()]


def test_full_disk_logs_once_and_writes_every_record_once(tiny_fs, caplog):
    """Issue 9: on a full disk every flush logged a traceback, and after recovery the mainlog held
    duplicated records. Now: one error line, and each record exactly once, in order."""
    caplog.set_level(logging.INFO, logger="fastrelay.mainlog")
    ml = MainLog(str(tiny_fs / "mainlog"))
    ml.open()
    try:
        _records(ml, 0, 50)
        _fill(tiny_fs)
        _records(ml, 50, 250)  # 250 flushes, every one fails (or writes a part only)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "write failed" in errors[0].getMessage(), [r.getMessage() for r in errors]
        assert not any(r.exc_info for r in caplog.records)
        (tiny_fs / "filler").unlink()
        ml.flush()
        assert "writing again; no record was lost" in caplog.text
    finally:
        ml.close()
    lines = _lines(tiny_fs / "mainlog")
    assert [f[3] for f in lines] == [f"r{i}@dst.test" for i in range(300)]
    assert all(len(f) == 12 and f[11].startswith("tls=") and f[1] == "D" for f in lines)


def test_full_disk_keeps_a_bounded_backlog_of_whole_records(tiny_fs, caplog):
    """Past max_pending bytes the oldest waiting records are dropped (and counted), never cut."""
    caplog.set_level(logging.INFO, logger="fastrelay.mainlog")
    ml = MainLog(str(tiny_fs / "mainlog"), max_pending=8192)
    ml.open()
    try:
        _records(ml, 0, 10)
        _fill(tiny_fs)
        _records(ml, 10, 2000)
        assert len(ml._pending) <= 8192 + 200  # the bound, give or take one record
        (tiny_fs / "filler").unlink()
        ml.flush()
    finally:
        ml.close()
    lines = _lines(tiny_fs / "mainlog")
    # D records carry tls=... as a twelfth field (the outbound branch, merged here).
    assert all(len(f) == 12 and f[11].startswith("tls=") and f[1] == "D" and f[10].startswith("250 2.0.0 ok ")
               for f in lines)
    nums = [int(f[3][1:].split("@")[0]) for f in lines]
    assert nums == sorted(set(nums)), "a record written twice or out of order"
    assert nums[:10] == list(range(10)) and nums[-1] == 2009  # the first ones and the newest survive
    dropped = 2010 - len(nums)
    assert dropped > 0 and f"{dropped} records were dropped" in caplog.text
