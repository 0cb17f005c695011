"""The CSV reader on real files: encodings, dialects, broken input, chunk boundaries, resume."""

from __future__ import annotations

import codecs
import csv
import io
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest

from jobs.imports.counting import RecordCounter
from jobs.imports.reader import CsvReader, FileFormatError
from jobs.imports.record_parser import NumberedRow
from jobs.imports.sources import bytes_source, local_file_source, rechunk


async def read_file(
    path: Path,
    *,
    chunk_size: int = 1 << 20,
    step_bytes: int = 1 << 20,
    max_rows: int = 5000,
    skip_rows: int = 0,
    parse_in_thread: bool = False,
) -> tuple[CsvReader, list[NumberedRow]]:
    reader = await CsvReader.open(
        local_file_source(path, chunk_size), step_bytes=step_bytes, parse_in_thread=parse_in_thread
    )
    rows = [row async for batch in reader.batches(max_rows, skip_rows) for row in batch]
    return reader, rows


def write(tmp_path: Path, data: bytes, name: str = "contacts.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def test_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbfEmail,First Name\r\na@x.com,Zo\xc3\xab\r\nb@x.com,Ann\r\n")
    reader, rows = await read_file(path)
    assert (reader.encoding, reader.delimiter) == ("utf-8-sig", ",")
    assert reader.header == ["Email", "First Name"]  # no BOM glued to the first header
    assert rows == [(2, ["a@x.com", "Zoë"]), (3, ["b@x.com", "Ann"])]
    assert await reader.count_rows() == 2


async def test_windows_1252_with_semicolons(tmp_path: Path) -> None:
    text = "email;first_name;company\r\nj@x.com;José;Müller & Söhne\r\nk@x.com;Zoë;€uro Ltd\r\n"
    reader, rows = await read_file(write(tmp_path, text.encode("cp1252")))
    assert (reader.encoding, reader.delimiter) == ("cp1252", ";")
    assert rows == [(2, ["j@x.com", "José", "Müller & Söhne"]), (3, ["k@x.com", "Zoë", "€uro Ltd"])]


@pytest.mark.parametrize(
    "bom, codec", [(codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")]
)
async def test_utf16_tab_separated(tmp_path: Path, bom: bytes, codec: str) -> None:
    # Excel's "Unicode text": UTF-16 with a BOM, tab-separated, CRLF.
    text = 'Email\tName\tCity\r\na@x.com\t李小龍\tمرحبا\r\nb@x.com\t"Tab\tinside"\t🎉\r\n'  # noqa: RUF001 - RTL text on purpose
    path = write(tmp_path, bom + text.encode(codec))
    for chunk_size in (1, 3, 1 << 20):  # odd sizes split UTF-16 code units and surrogate pairs
        reader, rows = await read_file(path, chunk_size=chunk_size, step_bytes=chunk_size)
        assert (reader.encoding, reader.delimiter) == ("utf-16", "\t")
        assert reader.header == ["Email", "Name", "City"]
        assert rows == [(2, ["a@x.com", "李小龍", "مرحبا"]), (3, ["b@x.com", "Tab\tinside", "🎉"])]


async def test_cr_only_line_ends(tmp_path: Path) -> None:
    path = write(tmp_path, b'email,name\ra@x.com,A\rb@x.com,"B\rC"\rc@x.com,D')
    for size in (1, 2, 5, 1 << 20):
        _reader, rows = await read_file(path, chunk_size=size, step_bytes=size)
        assert rows == [(2, ["a@x.com", "A"]), (3, ["b@x.com", "B\rC"]), (4, ["c@x.com", "D"])]


async def test_quoted_newlines_delimiters_and_doubled_quotes(tmp_path: Path) -> None:
    data = b'email,note\na@x.com,"x, ""y""\nz"\nb@x.com,w\n'
    _, rows = await read_file(write(tmp_path, data))
    assert rows == [(2, ["a@x.com", 'x, "y"\nz']), (3, ["b@x.com", "w"])]


async def test_row_numbers_count_records_not_lines(tmp_path: Path) -> None:
    # A three-line quoted record is one row; blank lines and `,` rows use a number, yield nothing.
    data = b'email,note\na@x.com,"l1\nl2\nl3"\n\nb@x.com,n\n,\nc@x.com,m\n'
    reader, rows = await read_file(write(tmp_path, data))
    assert rows == [(2, ["a@x.com", "l1\nl2\nl3"]), (4, ["b@x.com", "n"]), (6, ["c@x.com", "m"])]
    assert await reader.count_rows() == 3


async def test_header_only(tmp_path: Path) -> None:
    reader, rows = await read_file(write(tmp_path, b"email,name\r\n"))
    assert reader.header == ["email", "name"]
    assert rows == []
    assert await reader.count_rows() == 0


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "the file is empty"),
        (b"\r\n\n\n", "the file is empty (it has no header row)"),
        (b"\xef\xbb\xbf", "the file is empty (it has no header row)"),
    ],
)
async def test_empty_files(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(FileFormatError) as caught:
        await read_file(write(tmp_path, data))
    assert str(caught.value) == message


async def test_png_renamed_csv(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06" + bytes(64)
    with pytest.raises(FileFormatError) as caught:
        await read_file(write(tmp_path, png, "photo.csv"))
    assert str(caught.value) == (
        "the file is not a CSV text file (it looks binary: it starts like a PNG image)"
    )


async def test_nul_filled_file(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError) as caught:
        await read_file(write(tmp_path, bytes(100_000)))
    assert str(caught.value) == (
        "the file is not a CSV text file (it looks binary: 100% of its first 65536 characters "
        "are control characters such as NUL)"
    )


async def test_a_nul_in_one_cell_is_not_a_binary_file(tmp_path: Path) -> None:
    data = b"email,name\n" + b"a@x.com,Ann\n" * 20 + b"b@x.com,N\x00ll\n"
    _, rows = await read_file(write(tmp_path, data))
    assert rows[-1] == (22, ["b@x.com", "N\x00ll"])


async def test_invalid_utf8_after_the_first_64_kib_restarts_as_cp1252(tmp_path: Path) -> None:
    filler = b"".join(b"user%d@x.com,Plain\n" % i for i in range(5000))  # ASCII, > 64 KiB
    assert len(filler) > 64 * 1024
    data = b"email,name\n" + filler + "late@x.com,Müller\n".encode("cp1252") + b"z@x.com,Z\n"
    path = write(tmp_path, data)
    # Without a counting pass first: the restart happens mid-stream, no row lost or repeated.
    reader, rows = await read_file(path, chunk_size=4096, step_bytes=4096, max_rows=7)
    assert reader.encoding == "cp1252"
    assert [number for number, _ in rows] == list(range(2, 5004))
    assert rows[-2:] == [(5002, ["late@x.com", "Müller"]), (5003, ["z@x.com", "Z"])]
    # With the counting pass first (as the import job does), the whole read is cp1252.
    reader = await CsvReader.open(local_file_source(path, 4096), step_bytes=4096)
    assert reader.encoding == "utf-8"
    assert await reader.count_rows() == 5002
    assert reader.encoding == "cp1252"


def tricky_file() -> tuple[bytes, list[NumberedRow]]:
    """Multi-byte text, quoted newlines, doubled quotes, CRLF; and csv's own reading of it."""
    rng = random.Random(7)
    values = ["Zoë", "李小龍", "مرحبا بالعالم", "🎉🎉", 'say "hi"', "a,b", "x\r\ny", "", "p\nq"]
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["email", "name", "note"])
    for index in range(60):
        writer.writerow([f"u{index}@x.com", rng.choice(values[:4]), rng.choice(values)])
    text = out.getvalue()
    expected = list(csv.reader(io.StringIO(text, newline="")))
    numbered = [(number, row) for number, row in enumerate(expected, 1) if any(row)]
    return text.encode("utf-8"), numbered[1:]


async def test_chunk_boundaries_anywhere(tmp_path: Path) -> None:
    data, expected = tricky_file()
    assert any("\n" in row[2] for _, row in expected)  # the file has multi-line records
    path = write(tmp_path, data)
    for size in (1, 2, 3, 4, 5, 7, 11, 64, 1 << 20):
        _, rows = await read_file(path, chunk_size=size, step_bytes=size, max_rows=3)
        assert rows == expected, f"chunk size {size}"


async def test_parse_in_thread_gives_the_same_rows(tmp_path: Path) -> None:
    data, expected = tricky_file()
    _, rows = await read_file(write(tmp_path, data), step_bytes=5, parse_in_thread=True)
    assert rows == expected


async def test_skip_first_n_rows(tmp_path: Path) -> None:
    data, expected = tricky_file()
    path = write(tmp_path, data)
    for skip in (0, 1, 2, 17, 59, 60, 61, 100):
        _, rows = await read_file(path, chunk_size=9, step_bytes=9, skip_rows=skip, max_rows=4)
        assert rows == expected[skip:], f"skip {skip}"


async def test_batches_hold_at_most_max_rows(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\n" + b"".join(b"u%d@x.com\n" % i for i in range(5)))
    reader = await CsvReader.open(local_file_source(path))
    sizes = [len(batch) async for batch in reader.batches(max_rows=2)]
    assert sizes == [2, 2, 1]


async def test_a_200_kb_field_is_read_whole(tmp_path: Path) -> None:
    big = "é" * 200_000
    data = f'email,notes\na@x.com,"{big}"\nb@x.com,{big}\nc@x.com,ok\n'.encode()
    _, rows = await read_file(write(tmp_path, data), chunk_size=4096, step_bytes=4096)
    assert rows == [(2, ["a@x.com", big]), (3, ["b@x.com", big]), (4, ["c@x.com", "ok"])]


async def test_unclosed_quote_fails_with_the_row_number(tmp_path: Path) -> None:
    data = b'email,note\na@x.com,fine\nb@x.com,"open\nc@x.com,x\n'
    reader = await CsvReader.open(local_file_source(write(tmp_path, data)))
    with pytest.raises(FileFormatError) as caught:
        await reader.count_rows()
    assert str(caught.value) == (
        'row 3 opens a quoted field (") that is never closed; close it or remove the stray quote'
    )


async def test_stray_quote_inside_an_unquoted_cell(tmp_path: Path) -> None:
    # Quote parity is fooled by `5" screen`; csv is not, and the reader trusts csv.
    data = b'email,item\na@x.com,5" screen\nb@x.com,"q\nr"\nc@x.com,z\n'
    for size in (1, 3, 8, 1 << 20):
        _, rows = await read_file(write(tmp_path, data), chunk_size=size, step_bytes=size)
        assert rows == [
            (2, ["a@x.com", '5" screen']),
            (3, ["b@x.com", "q\nr"]),
            (4, ["c@x.com", "z"]),
        ]


@pytest.mark.parametrize(
    "header, delimiter",
    [
        (b"email,name,phone", ","),
        (b"email;name;phone", ";"),
        (b"email\tname\tphone", "\t"),
        (b'"Last, First, Middle";email;phone', ";"),  # commas inside quotes do not count
        (b"email", ","),
    ],
)
async def test_delimiter_from_the_header_line(
    tmp_path: Path, header: bytes, delimiter: str
) -> None:
    # The data row is full of commas: only the header decides.
    reader = await CsvReader.open(bytes_source(header + b"\na,b,c,d,e,f,g\n"))
    assert reader.delimiter == delimiter


async def test_rechunk_keeps_every_byte_in_order() -> None:
    rng = random.Random(3)
    data = bytes(rng.randrange(256) for _ in range(5000))
    for step in (1, 7, 1000, 9999):
        source = bytes_source(data, chunk_size=rng.randrange(1, 50))
        pieces = [piece async for piece in rechunk(source(), step)]
        assert b"".join(pieces) == data
        assert all(len(piece) == step for piece in pieces[:-1])


async def test_rows_stream_before_the_file_is_read_even_with_a_stray_quote() -> None:
    # Quote parity stays odd after `5" screen` to the end of the file; the reader must still cut
    # at line breaks (csv verifies) instead of carrying the rest of the file in memory.
    data = b'email,item\na@x.com,5" screen\n' + b"".join(b"u%d@x.com,x\n" % i for i in range(2000))
    consumed: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1000):
            consumed.append(start)
            yield data[start : start + 1000]

    reader = await CsvReader.open(chunks, step_bytes=1000)
    consumed.clear()
    async with aclosing(reader.batches(max_rows=10)) as batches:
        first = await anext(batches)
    assert first[0] == (2, ["a@x.com", '5" screen'])
    assert len(consumed) <= 2


def messy_lines(rng: random.Random, delimiter: str, newline: str, quotes: bool) -> str:
    """A header and records of every kind the counter must tell apart: blank lines, lines of
    delimiters only, whitespace-only cells, lone CRs inside a file of LFs, and, when `quotes`,
    quoted cells holding line breaks, delimiters and doubled quotes, and stray quotes."""
    cells = ["a@x.com", "Zoë", "李", " ", "", "5 in", "x\\y"]
    if quotes:
        cells += ['"q\r\nr"', '"a' + delimiter + 'b"', '"say ""hi"""', '5" screen', '""']
    lines = [""] * rng.choice([0, 0, 1, 2]) + [delimiter.join(["email", "name", "note"])]
    for _ in range(rng.randrange(1, 40)):
        kind = rng.random()
        if kind < 0.1:
            lines.append("")
        elif kind < 0.2:
            lines.append(delimiter * rng.randrange(1, 4))
        elif kind < 0.25:
            lines.append(rng.choice(cells) + "\r" + rng.choice(cells))  # a CR ends a record
        else:
            lines.append(delimiter.join(rng.choice(cells) for _ in range(3)))
    text = newline.join(lines)
    return text + newline if rng.random() < 0.5 else text


@pytest.mark.parametrize("quotes", [False, True], ids=["no quotes", "quotes"])
async def test_counting_pass_agrees_with_the_rows_read(quotes: bool) -> None:
    rng = random.Random(11 if quotes else 12)
    for case in range(300):
        delimiter = rng.choice([",", ";", "\t"])
        newline = rng.choice(["\n", "\r\n", "\r"])
        text = messy_lines(rng, delimiter, newline, quotes)
        data = (codecs.BOM_UTF8 if case % 7 == 0 else b"") + text.encode()
        size = rng.choice([1, 2, 3, 5, 16, 1 << 20])
        reader = await CsvReader.open(bytes_source(data, size), step_bytes=size)
        rows = [row async for batch in reader.batches() for row in batch]
        assert await reader.count_rows() == len(rows), (case, data, size)


@pytest.mark.parametrize(
    "data, records",
    [
        (b"email\na@x.com\n,,", 2),  # the last line, blank, has no line break
        (b"email\r\na@x.com\r\n\r\n;", 2),
        (b"email\ra@x.com\r,b\r", 3),
        (b"\xef\xbb\xbf\n\nemail\na@x.com", 2),  # blank lines between the BOM and the header
    ],
)
def test_record_counter_fed_everything_at_once(data: bytes, records: int) -> None:
    counter = RecordCounter(",;"[b";" in data], skip_bom=data.startswith(codecs.BOM_UTF8))
    counter.feed(data, final=True)
    assert counter.records == records
