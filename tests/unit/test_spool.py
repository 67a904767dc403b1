"""The publish spool file: order, commits across reopening, a torn tail, the cap, the lock."""

import logging

import pytest

from gateway.spool import Spool, SpoolError, spool_file_for


def record(i: int) -> dict:
    return {"s": i, "o": "origin", "e": {"event_id": f"c:{i:06d}", "type": "turn.final", "call_id": "c"}}


def opened(path, max_bytes: int = 1 << 20) -> Spool:
    spool = Spool(path, max_bytes)
    spool.open()
    return spool


def seqs(records) -> list[int]:
    return [r.data["s"] for r in records]


def test_records_come_back_in_order_and_the_file_empties_once_all_are_committed(tmp_path):
    spool = opened(tmp_path / "s.spool")
    for i in range(1, 6):
        assert spool.append(record(i))
    assert spool.pending == 5
    first = spool.peek(3)
    assert seqs(first) == [1, 2, 3]
    assert seqs(spool.peek(3)) == [1, 2, 3]  # peeking takes nothing
    spool.commit(first[:2])
    assert spool.pending == 3 and seqs(spool.peek(10)) == [3, 4, 5]
    spool.commit(spool.peek(10))
    assert spool.pending == 0 and spool.size == 0 and (tmp_path / "s.spool").stat().st_size == 0
    assert spool.append(record(6)) and seqs(spool.peek(10)) == [6]
    spool.close()


def test_a_reopened_spool_replays_only_what_was_not_committed(tmp_path):
    path = tmp_path / "s.spool"
    spool = opened(path)
    for i in range(1, 8):
        spool.append(record(i))
    spool.commit(spool.peek(4))
    spool.append(record(8))  # appended after a commit record
    spool.close()
    again = opened(path)
    assert again.pending == 4
    assert seqs(again.peek(100)) == [5, 6, 7, 8]
    again.close()


def test_a_truncated_last_record_is_skipped_with_a_log_line_and_the_rest_replays(tmp_path, caplog):
    """A crash in the middle of a write leaves half a line: it is cut off at open, every whole
    record before it replays, and records appended afterwards are not glued to the torn one."""
    path = tmp_path / "s.spool"
    spool = opened(path)
    for i in range(1, 4):
        spool.append(record(i))
    spool.close()
    whole = path.read_bytes()
    torn = b'{"s":4,"o":"origin","e":{"event_id":"c:000004","ty'
    path.write_bytes(whole + torn)
    with caplog.at_level(logging.WARNING, logger="gateway.spool"):
        again = opened(path)
    assert "skipping a truncated last record" in caplog.text and str(path) in caplog.text
    assert again.torn_bytes == len(torn) and again.corrupt == 0
    assert again.pending == 3 and path.read_bytes() == whole
    assert again.append(record(5))
    assert seqs(again.peek(10)) == [1, 2, 3, 5]
    again.close()
    assert opened(path).pending == 4


def test_a_torn_line_with_its_newline_in_the_middle_is_counted_and_skipped(tmp_path, caplog):
    path = tmp_path / "s.spool"
    spool = opened(path)
    spool.append(record(1))
    spool.close()
    with open(path, "ab") as f:
        f.write(b'{"s":2,"o":\n')  # bit rot: not JSON, yet a whole line
    spool = opened(path)
    spool.append(record(3))
    assert spool.corrupt == 1 and "unreadable record" in caplog.text
    assert seqs(spool.peek(10)) == [1, 3] and spool.pending == 2
    spool.close()


def test_the_size_cap_refuses_records_and_writes_nothing(tmp_path):
    path = tmp_path / "s.spool"
    spool = opened(path, max_bytes=4096)
    accepted = 0
    while spool.append(record(accepted + 1)):
        accepted += 1
    size = path.stat().st_size
    assert 0 < accepted and size <= 4096 and size == spool.size
    assert not spool.append(record(999)) and path.stat().st_size == size
    assert spool.pending == accepted
    spool.commit(spool.peek(accepted))
    assert spool.append(record(1000))  # room again once replayed
    spool.close()


def test_one_process_holds_the_spool(tmp_path):
    path = tmp_path / "s.spool"
    first = opened(path)
    with pytest.raises(SpoolError, match="held by another process"):
        Spool(path, 1 << 20).open()
    first.close()
    opened(path).close()  # free again


def test_the_file_is_private(tmp_path):
    path = tmp_path / "sub" / "s.spool"
    opened(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_default_path_is_next_to_the_sqlite_database_else_the_working_directory():
    assert str(spool_file_for("sqlite:////var/lib/earshot/earshot.db")) == "/var/lib/earshot/earshot.db.spool"
    assert str(spool_file_for("sqlite:///earshot.db")) == "earshot.db.spool"
    assert str(spool_file_for("postgresql+psycopg://u:p@h/db")) == "earshot-events.spool"
    assert str(spool_file_for("sqlite:///x.db", "/tmp/mine.spool")) == "/tmp/mine.spool"
