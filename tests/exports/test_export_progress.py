"""The live row count: CSV records counted in COPY's byte stream, reported at intervals."""

from __future__ import annotations

import csv
import io
import random

import pytest

from jobs.exports.progress import CsvRecordCounter, ProgressSink

TRICKY_ROWS = [
    ["id", "note"],
    ["1", "plain"],
    ["2", "line one\nline two"],
    ["3", 'say ""hi""\n and "bye"'],
    ["4", "a,b\r\nc"],
    ["5", '"'],
    ["6", ""],
]


def csv_bytes(rows: list[list[str]]) -> bytes:
    # The shape PostgreSQL's COPY CSV writes: minimal quoting, "\n" record ends.
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 64, 10_000])
def test_counts_records_not_newlines_whatever_the_chunking(chunk_bytes: int) -> None:
    data = csv_bytes(TRICKY_ROWS)
    assert data.count(b"\n") == 10  # 7 records, 3 newlines inside quoted cells
    counter = CsvRecordCounter()
    for start in range(0, len(data), chunk_bytes):
        counter.feed(data[start : start + chunk_bytes])
    assert counter.records == 7


def test_random_cells_and_random_chunks() -> None:
    rng = random.Random(4)
    alphabet = ['"', "\n", ",", "a", "é", "\r", " "]
    rows = [["".join(rng.choices(alphabet, k=rng.randint(0, 6))) for _ in range(3)]]
    rows += [[str(i), *("".join(rng.choices(alphabet, k=5)) for _ in range(2))] for i in range(500)]
    data = csv_bytes(rows)
    counter = CsvRecordCounter()
    position = 0
    while position < len(data):
        step = rng.randint(1, 50)
        counter.feed(memoryview(data)[position : position + step])
        position += step
    assert counter.records == 501


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def bytes_written(self) -> int:
        return len(self.data)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.data += chunk


async def test_sink_forwards_every_byte_and_reports_at_most_once_per_interval() -> None:
    out, clock, reports = Collect(), FakeClock(), []

    async def report(rows: int) -> None:
        reports.append((clock.now_s, rows))

    sink = ProgressSink(out, report, interval_s=1.0, clock=clock)
    await sink.write(b"id,name\n1,a\n")
    clock.now_s = 100.5
    await sink.write(b"2,b\n3,")  # half a record: not counted yet
    clock.now_s = 101.0
    await sink.write(b'"c\nd"\n')
    clock.now_s = 101.9
    await sink.write(b"4,e\n")
    clock.now_s = 102.0
    await sink.write(b"5,f\n")
    assert reports == [(101.0, 3), (102.0, 5)]
    assert out.data == b'id,name\n1,a\n2,b\n3,"c\nd"\n4,e\n5,f\n'
    assert sink.rows == 5
