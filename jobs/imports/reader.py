"""Stream CSV records out of an async byte source, in batches, without blocking the event loop.

Each step decodes about `step_bytes` of the file, cuts the text after the last line break that
ends a record, and runs `csv.reader` over all those lines at once (the C parser does the per-row
work; Python only touches whole lists). The record cut is chosen by quote parity and verified
by csv itself: a sentinel line after the text comes back as its own record only when the text
ended outside quotes; otherwise the open record is carried into the next step. Stray quotes in
unquoted cells therefore cost speed, never correctness.

Row numbers count records (a quoted newline does not start a row), the header is row 1. Records
whose fields are all empty (blank lines, `,,,`) use a row number but are not data rows.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import aclosing
from itertools import chain, compress, count
from typing import TypeVar

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

__all__ = ["CsvReader", "FileFormatError", "NumberedRow"]

NumberedRow = tuple[int, list[str]]
_T = TypeVar("_T")

DEFAULT_STEP_BYTES = 256 << 10  # ~2,000 rows, ~5-20 ms of parsing (1 MiB: 20-45 ms)
# The counting pass on a thread: mostly C-speed byte counts, so bigger steps save thread hops
# (64 KiB steps: 0.95 s per 1M rows, 1 MiB: 0.62 s).
COUNT_STEP_BYTES = 1 << 20
# One record longer than this is refused: it is almost always an unclosed quote swallowing the
# rest of the file, and carrying it on would grow memory with the file's size.
MAX_RECORD_CHARS = 16 << 20
_SENTINEL = "\x00\ufdd0end of chunk\ufdd0\x00"  # U+FDD0 is a noncharacter: no file holds this
_SENTINEL_LINES = (_SENTINEL + "\n",)


class _Parser:
    """Decode and parse one pass over the file, step by step; keeps the unfinished record."""

    def __init__(self, encoding: Encoding, delimiter: str, first_row_number: int = 1) -> None:
        self._decoder = codecs.getincrementaldecoder(encoding.name)(encoding.errors)
        self._delimiter = delimiter
        self._carry = ""
        self._next_row_number = first_row_number

    @property
    def carry(self) -> str:
        """The text after the last complete record: it starts a record."""
        return self._carry

    @property
    def next_row_number(self) -> int:
        return self._next_row_number

    def feed(self, data: bytes, final: bool) -> list[NumberedRow]:
        """Return the non-blank records completed by `data` (all of them when `final`)."""
        text = self._decoder.decode(data, final)
        if self._carry:
            text = self._carry + text
        cut = len(text) if final else _record_cut(text)
        head, self._carry = text[:cut], text[cut:]
        if not head:
            self._check_carry()
            return []
        lines = chain(io.StringIO(head, newline=""), _SENTINEL_LINES)
        try:
            rows = list(csv.reader(lines, delimiter=self._delimiter))
        except csv.Error as exc:  # only the field size limit is left to trip in lax mode
            raise FileFormatError(f"row {self._next_row_number} and after: {exc}") from None
        last = rows.pop()
        if last != [_SENTINEL]:
            # The cut fell inside a quoted field: csv swallowed the sentinel into it.
            if final:
                raise FileFormatError(
                    f'row {self._next_row_number + len(rows)} opens a quoted field (") that is '
                    "never closed; close it or remove the stray quote"
                )
            self._carry = head[self._last_record_start(head) :] + self._carry
            self._check_carry()
        first = self._next_row_number
        self._next_row_number += len(rows)
        return list(compress(zip(count(first), rows), map(any, rows)))

    def _last_record_start(self, head: str) -> int:
        """Offset in `head` where its last (unfinished) record starts. Rare, so plain Python."""
        lines = io.StringIO(head, newline="").readlines()
        reader = csv.reader(lines, delimiter=self._delimiter)
        start_line = lines_read = 0
        for _ in reader:
            start_line, lines_read = lines_read, reader.line_num
        return sum(map(len, lines[:start_line]))

    def _check_carry(self) -> None:
        if len(self._carry) > MAX_RECORD_CHARS:
            raise FileFormatError(
                f"row {self._next_row_number} is longer than {MAX_RECORD_CHARS >> 20} MiB: "
                'it probably opens a quoted field (") that is never closed'
            )


def _record_cut(text: str) -> int:
    """Index just past the last line break that likely ends a record (0: none yet).

    Prefers a break with an even number of quotes before it; `text` starts at a record start.
    """
    if "\n" in text:
        brk, end = "\n", len(text)
    else:  # CR-only line ends; a CR at the very end may be half of a CRLF split across steps
        brk, end = "\r", len(text) - 1
    last = pos = text.rfind(brk, 0, end)
    if pos < 0:
        return 0
    quotes = text.count('"', 0, pos)
    while quotes % 2:
        before = text.rfind(brk, 0, pos)
        if before < 0:  # parity found nothing (stray quotes?): let csv decide at the last break
            return last + 1
        quotes -= text.count('"', before, pos)
        pos = before
    return pos + 1


class RecordCounter:
    """Counts the records `_Parser` would yield (blank ones apart) without building them.

    For the bytes of UTF-8 and Windows-1252 files: both keep quotes, delimiters and line breaks
    as single ASCII bytes that never occur inside another character. A step without a quote
    is counted at C speed: a record ends at each CR, LF or CRLF, and one of delimiters only is
    blank. A step with quotes is parsed by a `_Parser` reading the bytes as Latin-1 (one
    character per byte, so its unfinished record goes back to bytes unchanged). Files that
    quote every field are therefore parsed as before; most exports quote little or nothing.
    """

    def __init__(self, delimiter: str, *, skip_bom: bool = False, check_utf8: bool = False) -> None:
        self._delimiter = delimiter
        self._delimiter_byte = delimiter.encode()
        # A line break and, after it, a blank line (one that ends with a break of its own).
        # One pattern per break, each starting with a literal byte: `re` then jumps from one
        # candidate to the next at C speed (an alternation first is ~10x slower).
        blank_line = rb"(?=" + re.escape(self._delimiter_byte) + rb"*[\r\n])"
        self._blank_line_after_lf = re.compile(rb"\n" + blank_line)
        self._blank_line_after_cr = re.compile(rb"\r(?!\n)" + blank_line)  # not CRLF's CR
        self._carry = b""
        self._skip_bom = skip_bom
        # Whether the bytes are UTF-8 after all: a decode that keeps nothing, ~GB/s.
        self._utf8 = codecs.getincrementaldecoder("utf-8")() if check_utf8 else None
        self.not_utf8 = False
        self.records = 0  # non-blank records so far
        self._row_number = 1  # the next record's row number, blank ones counted

    def feed(self, data: bytes, final: bool) -> None:
        if self._utf8 is not None:
            try:
                self._utf8.decode(data, final)
            except UnicodeDecodeError:
                self.not_utf8, self._utf8 = True, None
        pending = self._carry + data
        if self._skip_bom:
            if len(pending) < len(codecs.BOM_UTF8) and not final:
                self._carry = pending
                return
            pending = pending.removeprefix(codecs.BOM_UTF8)
            self._skip_bom = False
        if b'"' in pending:
            self._feed_parser(pending, final)
            return
        cut = len(pending) if final else _line_cut(pending)
        head, self._carry = pending[:cut], pending[cut:]
        if len(self._carry) > MAX_RECORD_CHARS:
            raise FileFormatError(
                f"row {self._row_number} is longer than {MAX_RECORD_CHARS >> 20} MiB"
            )
        lines, blank = self._count_lines(head)
        self.records += lines - blank
        self._row_number += lines

    def _feed_parser(self, pending: bytes, final: bool) -> None:
        parser = _Parser(_LATIN1, self._delimiter, first_row_number=self._row_number)
        self.records += len(parser.feed(pending, final))
        self._row_number = parser.next_row_number
        self._carry = parser.carry.encode("latin-1")

    def _count_lines(self, head: bytes) -> tuple[int, int]:
        """(lines, blank lines) of `head`: it starts a line, and each line ends with a break
        except, at the end of the file, the last."""
        if not head:
            return 0, 0
        lines = head.count(b"\n")
        blank = len(self._blank_line_after_lf.findall(head))
        if b"\r" in head:
            lines += head.count(b"\r") - head.count(b"\r\n")
            blank += len(self._blank_line_after_cr.findall(head))
        first_end = min(_find(head, b"\n"), _find(head, b"\r"))
        if not head[:first_end].strip(self._delimiter_byte):
            blank += 1
        if not head.endswith((b"\n", b"\r")):  # the file's last line, without a break
            lines += 1
            last_start = max(head.rfind(b"\n"), head.rfind(b"\r")) + 1
            if last_start and not head[last_start:].strip(self._delimiter_byte):
                blank += 1  # (a first line that is also the last was counted above)
        return lines, blank


_LATIN1 = Encoding("latin-1", "strict")


def _find(data: bytes, sub: bytes) -> int:
    index = data.find(sub)
    return len(data) if index < 0 else index


def _line_cut(data: bytes) -> int:
    """Index just past the last line break (0: none); a CR at the very end may be half of a
    CRLF split across steps, so it waits for the next step."""
    end = len(data) - 1 if data.endswith(b"\r") else len(data)
    return max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1


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
    ) -> AsyncIterator[list[NumberedRow]]:
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
        parser = _Parser(encoding, self.delimiter)
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
