"""Counting CSV records as COPY's bytes pass through, for a live `row_count` during an export.

The final `row_count` comes from PostgreSQL's own `COPY n` status; this count only feeds the
progress shown while the export runs, so it never decides anything. It is still exact: a
newline ends a record unless it sits inside a quoted cell, and a quote toggles "inside" (an
escaped `""` toggles twice). Counting runs at C speed (`bytes.count`, `bytes.split`) on the
chunks asyncpg hands over, so it costs a few percent of the export, not a Python loop per row.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from worker.storage import StorageWriter

#: How often, at most, the running count is written to `exports.row_count`.
DEFAULT_REPORT_INTERVAL_S = 1.0


class CsvRecordCounter:
    """Counts complete CSV records (header included) in a byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self.records = 0
        self._in_quotes = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        data = bytes(chunk) if isinstance(chunk, memoryview) else chunk
        if not self._in_quotes and b'"' not in data:
            self.records += data.count(b"\n")  # the common case: no quoted cell in this chunk
            return
        pieces = data.split(b'"')
        # pieces alternate outside/inside quotes, starting with the state we are in.
        outside = pieces[1::2] if self._in_quotes else pieces[0::2]
        self.records += sum(piece.count(b"\n") for piece in outside)
        if len(pieces) % 2 == 0:  # an odd number of quotes flips the state
            self._in_quotes = not self._in_quotes


class ProgressSink:
    """asyncpg's COPY `output=`: passes chunks to `out`, reports data rows every `interval_s`.

    `report(rows)` is awaited from inside the COPY (it briefly holds the stream back, which
    is why it runs at most once per interval); its errors fail the export like any other.
    """

    def __init__(
        self,
        out: StorageWriter,
        report: Callable[[int], Awaitable[None]],
        *,
        interval_s: float = DEFAULT_REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._report = report
        self._interval_s = interval_s
        self._clock = clock
        self._next_report_s = clock() + interval_s
        self._counter = CsvRecordCounter()

    @property
    def rows(self) -> int:
        """Data rows written so far (the header record is not a row)."""
        return max(0, self._counter.records - 1)

    async def write(self, chunk: bytes) -> None:
        await self._out.write(chunk)
        self._counter.feed(chunk)
        now_s = self._clock()
        if now_s >= self._next_report_s:
            self._next_report_s = now_s + self._interval_s
            await self._report(self.rows)
