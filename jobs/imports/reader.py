"""Stream CSV records out of an async byte source, in batches, without blocking the event loop.

Each pass re-reads the source and parses it step by step (`record_parser`); the counting pass
only counts (`counting`). Row numbers count records, the header is row 1.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from contextlib import aclosing
from typing import TypeVar

from jobs.imports.counting import RecordCounter
from jobs.imports.record_parser import MAX_RECORD_CHARS, NumberedRow, RecordParser
from jobs.imports.sniff import (
    CP1252,
    SNIFF_BYTES,
    Encoding,
    FileFormatError,
    choose_delimiter,
    encoding_named,
    first_line,
    sniff_encoding,
)
from jobs.imports.sources import SourceFactory, close_iterator, rechunk

__all__ = ["CsvReader", "FileFormatError"]

_T = TypeVar("_T")

DEFAULT_STEP_BYTES = 256 << 10  # ~2,000 rows, ~5-20 ms of parsing (1 MiB: 20-45 ms)
# The counting pass on a thread: mostly C-speed byte counts, so bigger steps save thread hops
# (64 KiB steps: 0.95 s per 1M rows, 1 MiB: 0.62 s).
COUNT_STEP_BYTES = 1 << 20


class CsvReader:
    """A CSV file opened for reading: encoding, delimiter and header are known.

    Every pass (`count_rows`, `batches`) re-reads the file from the source factory; the job's
    factories read one pinned file or object, so every pass sees the same bytes (`sources.py`).
    """

    def __init__(
        self,
        source: SourceFactory,
        encoding: Encoding,
        delimiter: str,
        *,
        step_bytes: int = DEFAULT_STEP_BYTES,
        parse_in_thread: bool = False,
        executor: Executor | None = None,
    ) -> None:
        self._source = source
        self._encoding = encoding
        self.delimiter = delimiter
        self.header: list[str] = []
        self.header_row_number = 1
        self._step_bytes = step_bytes
        self._parse_in_thread = parse_in_thread
        # One long-lived thread instead of the default pool: each thread that allocates gets
        # its own malloc arena, and several arenas made a worker's RSS grow with the file.
        self._executor = executor

    @classmethod
    async def open(
        cls,
        source: SourceFactory,
        *,
        encoding: str | None = None,
        step_bytes: int = DEFAULT_STEP_BYTES,
        parse_in_thread: bool = False,
        executor: Executor | None = None,
    ) -> CsvReader:
        """Sniff encoding and delimiter, read the header; FileFormatError if not a CSV text.

        `encoding` (a resume): the `encoding` an earlier reader of the same bytes ended with,
        used instead of the guess from the first bytes.
        """
        if csv.field_size_limit() < MAX_RECORD_CHARS + 1:
            # Process-wide, so only ever raised: big fields become row errors, not crashes.
            csv.field_size_limit(MAX_RECORD_CHARS + 1)
        head, at_eof = await _read_head(source, SNIFF_BYTES)
        if not head:
            raise FileFormatError("the file is empty")
        chosen = sniff_encoding(head, at_eof)  # refuses binary files either way
        if encoding is not None:
            chosen = encoding_named(encoding)
        text = codecs.getincrementaldecoder(chosen.name)("replace").decode(head, at_eof)
        delimiter = choose_delimiter(first_line(text.lstrip("\r\n")))
        reader = cls(
            source,
            chosen,
            delimiter,
            step_bytes=step_bytes,
            parse_in_thread=parse_in_thread,
            executor=executor,
        )
        async with aclosing(reader._records()) as steps:
            async for step in steps:
                if step:
                    reader.header_row_number, reader.header = step[0]
                    return reader
        raise FileFormatError("the file is empty (it has no header row)")

    @property
    def encoding(self) -> str:
        """The codec name in use; becomes "cp1252" if invalid UTF-8 turned up mid-file."""
        return self._encoding.name

    async def count_rows(self) -> int:
        """Count the data rows (the rows `batches` yields), in a pass of its own over the file.

        UTF-16 is parsed in full; every other encoding goes through `RecordCounter`, which
        parses only the stretches of the file that hold quotes.
        """
        if self._encoding.name == "utf-16":
            total = 0
            async for step in self._records():
                total += len(step)
            return total - 1  # the header
        counter = RecordCounter(
            self.delimiter,
            skip_bom=self._encoding.name == "utf-8-sig",
            check_utf8=self._encoding.may_fall_back,
        )
        chunks = self._source()
        step_bytes = max(self._step_bytes, COUNT_STEP_BYTES if self._parse_in_thread else 0)
        steps = rechunk(chunks, step_bytes)
        try:
            async for data in steps:
                await self._run(counter.feed, data, False)
            await self._run(counter.feed, b"", True)
        finally:
            await steps.aclose()
            await close_iterator(chunks)
        if counter.not_utf8:
            # Found here, the fallback applies to the whole import, not from mid-file on.
            self._encoding = CP1252
        return counter.records - 1  # the header

    async def batches(
        self, max_rows: int = 5000, skip_rows: int = 0, first_rows: int | None = None
    ) -> AsyncGenerator[list[NumberedRow], None]:
        """Yield data rows as lists of at most `max_rows` `(row_number, fields)` pairs.

        `skip_rows` drops the first data rows (resuming after the last committed batch);
        `first_rows` sizes the first batch instead of `max_rows` (resuming a batch some of whose
        parts committed: it must cover the same rows). Awaits between batches, so a consumer
        that does not await still lets the loop run.
        """
        size = first_rows or max_rows
        pending: list[NumberedRow] = []
        to_skip = skip_rows + 1  # the header
        async with aclosing(self._records()) as steps:
            async for step in steps:
                if to_skip:
                    if len(step) <= to_skip:
                        to_skip -= len(step)
                        continue
                    step, to_skip = step[to_skip:], 0
                pending += step
                start = 0
                while len(pending) - start >= size:
                    yield pending[start : start + size]
                    start += size
                    size = max_rows
                    await asyncio.sleep(0)
                del pending[:start]
        if pending:
            yield pending

    async def _records(self) -> AsyncGenerator[list[NumberedRow], None]:
        """All non-blank records, header included, one list per step; falls back to cp1252."""
        emitted = 0  # row number of the last record yielded, to skip them after a restart
        while True:
            try:
                async for step in self._pass(self._encoding):
                    if step and step[0][0] <= emitted:
                        step = [row for row in step if row[0] > emitted]
                    if step:
                        emitted = step[-1][0]
                        yield step
                return
            except UnicodeDecodeError:
                if not self._encoding.may_fall_back:
                    raise
                # Not UTF-8 after all: the record structure is the same in cp1252 (ASCII
                # delimiters, quotes and line breaks), so row numbers carry over.
                self._encoding = CP1252

    async def _pass(self, encoding: Encoding) -> AsyncGenerator[list[NumberedRow], None]:
        parser = RecordParser(encoding, self.delimiter)
        chunks = self._source()
        steps = rechunk(chunks, self._step_bytes)
        try:
            async for data in steps:
                yield await self._run(parser.feed, data, False)
            yield await self._run(parser.feed, b"", True)
        finally:
            await steps.aclose()
            await close_iterator(chunks)

    async def _run(self, feed: Callable[[bytes, bool], _T], data: bytes, final: bool) -> _T:
        if self._parse_in_thread:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, feed, data, final)
        result = feed(data, final)
        await asyncio.sleep(0)  # in-memory sources never await: give the loop its turn
        return result


async def _read_head(source: SourceFactory, size_bytes: int) -> tuple[bytes, bool]:
    """The first `size_bytes` of the source (fewer at EOF) and whether EOF was reached."""
    chunks = source()
    parts: list[bytes] = []
    got = 0
    try:
        async for chunk in chunks:
            parts.append(chunk)
            got += len(chunk)
            if got >= size_bytes:
                return b"".join(parts)[:size_bytes], False
    finally:
        await close_iterator(chunks)
    return b"".join(parts), True
