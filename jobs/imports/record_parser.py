"""Cut decoded CSV text into numbered records, one step of the file at a time.

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

import codecs
import csv
import io
from itertools import chain, compress, count

from jobs.imports.sniff import Encoding, FileFormatError

NumberedRow = tuple[int, list[str]]

# One record longer than this is refused: it is almost always an unclosed quote swallowing the
# rest of the file, and carrying it on would grow memory with the file's size.
MAX_RECORD_CHARS = 16 << 20
_SENTINEL = "\x00\ufdd0end of chunk\ufdd0\x00"  # U+FDD0 is a noncharacter: no file holds this
_SENTINEL_LINES = (_SENTINEL + "\n",)


class RecordParser:
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
