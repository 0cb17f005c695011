"""Count a file's data rows (`total_rows`) from its bytes, parsing only the stretches that
hold quotes: the counting pass before the first batch (`CsvReader.count_rows`)."""

from __future__ import annotations

import codecs
import re

from jobs.imports.record_parser import MAX_RECORD_CHARS, RecordParser
from jobs.imports.sniff import Encoding, FileFormatError


class RecordCounter:
    """Counts the records `RecordParser` would yield (blank ones apart) without building them.

    For the bytes of UTF-8 and Windows-1252 files: both keep quotes, delimiters and line breaks
    as single ASCII bytes that never occur inside another character. A step without a quote
    is counted at C speed: a record ends at each CR, LF or CRLF, and one of delimiters only is
    blank. A step with quotes is parsed by a `RecordParser` reading the bytes as Latin-1 (one
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
        parser = RecordParser(_LATIN1, self._delimiter, first_row_number=self._row_number)
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
