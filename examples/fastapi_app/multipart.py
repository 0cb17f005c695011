"""The file of a `multipart/form-data` upload (an HTML form's), as it streams in.

`file_chunks` feeds the body to python-multipart's streaming parser a piece at a time and
yields the bytes of the one file field as the parser finds them, so `uploads.save_upload`
writes a form upload exactly as it writes a raw one. Starlette's `request.form()` is not used:
it spools every file into a temporary file (in memory up to 1 MiB) before the app sees it.
Other fields are ignored, up to `MAX_FIELD_BYTES` in all; their values are not kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus

from fastapi import HTTPException
from python_multipart.multipart import MultipartParser, parse_options_header

FILE_FIELD = "file"
# The form's other fields (a CSRF token, a note): a few KiB at most in any real form.
MAX_FIELD_BYTES = 64 * 1024
# One part's header names and values together: a browser sends two short headers
# (Content-Disposition, Content-Type); more than this is not a form, and is not held in memory.
MAX_PART_HEADER_BYTES = 8 * 1024


def _bad_form(why: str) -> HTTPException:
    return HTTPException(HTTPStatus.BAD_REQUEST, f"{why}: send the CSV as the form field 'file'")


class _FormState:
    """What the parser's callbacks have seen so far; `found` holds file bytes not yet yielded."""

    def __init__(self) -> None:
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.header_bytes = 0
        self.in_file = False
        self.files = 0
        self.field_bytes = 0
        self.ended = False
        self.found: list[bytes] = []

    def on_part_begin(self) -> None:
        self.disposition = b""
        self.header_bytes = 0

    def _count_header_bytes(self, count: int) -> None:
        self.header_bytes += count
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise _bad_form(f"a part's headers hold more than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        kind, options = parse_options_header(self.disposition)
        is_file = kind == b"form-data" and options.get(b"name") == FILE_FIELD.encode()
        if is_file and b"filename" in options:
            self.files += 1
            if self.files > 1:
                raise _bad_form("more than one file in the form")
            self.in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.found.append(data[start:end])
            return
        self.field_bytes += end - start
        if self.field_bytes > MAX_FIELD_BYTES:
            raise _bad_form(f"the form's other fields hold more than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        self.in_file = False

    def on_end(self) -> None:
        self.ended = True


async def file_chunks(body: AsyncIterator[bytes], content_type: str) -> AsyncIterator[bytes]:
    """The file field's bytes from a multipart `body`; 400 for a form without exactly one."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise _bad_form("a multipart body needs a boundary in its Content-Type")
    state = _FormState()
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": state.on_part_begin,
                "on_header_field": state.on_header_field,
                "on_header_value": state.on_header_value,
                "on_header_end": state.on_header_end,
                "on_headers_finished": state.on_headers_finished,
                "on_part_data": state.on_part_data,
                "on_part_end": state.on_part_end,
                "on_end": state.on_end,
            },
        )
        async for piece in body:
            parser.write(piece)
            found, state.found = state.found, []
            for chunk in found:
                yield chunk
        parser.finalize()
    except ValueError as error:  # python-multipart's parse errors are ValueErrors
        raise _bad_form(f"not a valid multipart form ({error})") from None
    if not state.ended:
        raise _bad_form("the multipart form ends early")
    if state.files == 0:
        raise _bad_form("the form has no file")
