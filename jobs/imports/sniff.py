"""Decide how to read a CSV file from its first bytes: text or not, encoding, delimiter.

Encodings (CONTRACT §8): a byte-order mark declares UTF-8 or UTF-16; without one the file is
UTF-8 if its bytes are, else Windows-1252. `csv.Sniffer` is never used: it guesses from the
whole sample and can be steered by cell contents; the delimiter is chosen from the header only.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from worker.errors import PermanentError

SNIFF_BYTES = 64 * 1024

# Above this share of control characters a file is binary. Text has none, random bytes have
# ~11% (29 of 256 values), and a CSV with a stray NUL in one cell stays far below it.
BINARY_CONTROL_SHARE = 0.05
_CONTROL_CHARS = tuple(chr(c) for c in range(32) if chr(c) not in "\t\n\r\f")

# Formats people upload by mistake, with what to tell them.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "it starts like a PNG image"),
    (b"\xff\xd8\xff", "it starts like a JPEG image"),
    (b"GIF87a", "it starts like a GIF image"),
    (b"GIF89a", "it starts like a GIF image"),
    (b"%PDF-", "it starts like a PDF document"),
    (b"PK\x03\x04", "it is a ZIP archive, e.g. an Excel .xlsx workbook: save it as CSV first"),
    (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        "it is an Office document, e.g. an Excel .xls workbook: save it as CSV first",
    ),
    (b"\x1f\x8b", "it is a gzip archive: decompress it first"),
)

DELIMITERS = (",", ";", "\t")


class FileFormatError(PermanentError):
    """The file cannot be read as a contacts CSV; the message says why, for a person."""


@dataclass(frozen=True)
class Encoding:
    """How to decode the file. `errors="strict"` only for undeclared UTF-8 (it may fall back)."""

    name: str
    errors: str

    @property
    def may_fall_back(self) -> bool:
        """True when invalid bytes later in the file mean: restart as Windows-1252."""
        return self.name == "utf-8" and self.errors == "strict"


UTF8_GUESS = Encoding("utf-8", "strict")
UTF8_BOM = Encoding("utf-8-sig", "replace")
UTF16_BOM = Encoding("utf-16", "replace")
CP1252 = Encoding("cp1252", "replace")  # 5 byte values are undefined in cp1252: show U+FFFD
_BY_NAME = {encoding.name: encoding for encoding in (UTF8_GUESS, UTF8_BOM, UTF16_BOM, CP1252)}


def encoding_named(name: str) -> Encoding:
    """The encoding a first run settled on (`CsvReader.encoding`), to read a resume the same
    way: a resume skips the counting pass, which is where a late invalid UTF-8 byte is found."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise FileFormatError(f"unknown encoding {name!r} stored for this import") from None


def sniff_encoding(head: bytes, at_eof: bool) -> Encoding:
    """Choose the encoding from the first bytes; raise FileFormatError when they are not text."""
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            raise FileFormatError(f"the file is not a CSV text file (it looks binary: {what})")
    if head.startswith(codecs.BOM_UTF8):
        encoding = UTF8_BOM
    elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = UTF16_BOM
    else:
        try:
            # final=False: the sample may end inside a multi-byte character.
            codecs.getincrementaldecoder("utf-8")().decode(head, final=at_eof)
            encoding = UTF8_GUESS
        except UnicodeDecodeError:
            encoding = CP1252
    sample = codecs.getincrementaldecoder(encoding.name)("replace").decode(head, final=at_eof)
    check_text(sample)
    return encoding


def check_text(sample: str) -> None:
    """Raise FileFormatError when a decoded sample is mostly control characters (NUL-filled...)."""
    if not sample:
        return
    controls = sum(map(sample.count, _CONTROL_CHARS))
    if controls > BINARY_CONTROL_SHARE * len(sample):
        share_pct = 100 * controls / len(sample)
        raise FileFormatError(
            "the file is not a CSV text file (it looks binary: "
            f"{share_pct:.0f}% of its first {len(sample)} characters are control characters "
            "such as NUL)"
        )


def first_line(text: str) -> str:
    """The text up to the first line break outside double quotes (the header line)."""
    in_quotes = False
    for index, char in enumerate(text):
        if char == '"':
            in_quotes = not in_quotes
        elif char in "\r\n" and not in_quotes:
            return text[:index]
    return text


def choose_delimiter(header_line: str) -> str:
    """The candidate that occurs most often outside quotes in the header; `,` on a tie or none."""
    counts = dict.fromkeys(DELIMITERS, 0)
    in_quotes = False
    for char in header_line:
        if char == '"':
            in_quotes = not in_quotes
        elif not in_quotes and char in counts:
            counts[char] += 1
    # max() keeps the first of equal counts, and DELIMITERS starts with ",".
    return max(DELIMITERS, key=counts.__getitem__)
