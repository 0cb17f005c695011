"""Validate CSV rows into contact records or row errors, a whole batch per call (CONTRACT §8).

Speed: pydantic with EmailStr manages ~12k rows/s; this is plain Python with one precompiled
regex. Most rows take a fast path (right width, every field <= 64 characters, no NUL in the
batch) where only the email and the tags need checking, because every length limit is >= 64;
any other row goes through `_check_row`, which applies every rule. Both paths share the email
and tag rules, so they cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter
from typing import NamedTuple

from jobs.imports.headers import CANONICAL_COLUMNS, HeaderMap
from jobs.imports.reader import NumberedRow

MAX_FIELD_CHARS = 64 * 1024  # any field, any column (also ignored ones)
MAX_CHARS: dict[str, int] = {
    "email": 254,  # RFC 5321 path limit (256) minus the angle brackets
    "first_name": 255,
    "last_name": 255,
    "phone": 64,
    "company": 255,
    "job_title": 255,
    "city": 255,
    "country": 255,
    "linkedin_url": 2048,
    "tags": MAX_FIELD_CHARS,  # bounded per tag and by count instead
}
MAX_LOCAL_PART_CHARS = 64  # RFC 5321 4.5.3.1.1
MAX_TAG_CHARS = 64
MAX_TAGS = 50
MAX_PAYLOAD_VALUE_CHARS = 1024  # an error row never stores a 200 KB cell
_FAST_MAX_CHARS = min(min(MAX_CHARS.values()), MAX_TAG_CHARS)

# The WHATWG HTML "valid e-mail address" (https://html.spec.whatwg.org/#valid-e-mail-address):
# ASCII only, so an internationalised domain must arrive as punycode.
_EMAIL = re.compile(
    r"[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
)
_is_email = _EMAIL.fullmatch


class ContactRow(NamedTuple):
    """A valid row, in the column order of the staging table's COPY."""

    row_number: int
    email: str  # trimmed, lower-cased
    first_name: str | None
    last_name: str | None
    phone: str | None
    company: str | None
    job_title: str | None
    city: str | None
    country: str | None
    linkedin_url: str | None
    tags: list[str] | None


class RowError(NamedTuple):
    """A rejected row: `message` names each column and its problem; payload values <= 1 KiB."""

    row_number: int
    message: str
    payload: dict[str, str]


class ValidatedBatch(NamedTuple):
    rows: list[ContactRow]
    errors: list[RowError]


def email_problem(email: str | None) -> str | None:
    """Why `email` (already trimmed) is not acceptable, or None when it is."""
    if email is None:
        return "email: missing"
    if not _is_email(email):
        return "email: not a valid email address"
    if len(email) > MAX_CHARS["email"]:
        return f"email: not a valid email address (longer than {MAX_CHARS['email']} characters)"
    if email.index("@") > MAX_LOCAL_PART_CHARS:
        return (
            "email: not a valid email address "
            f"(more than {MAX_LOCAL_PART_CHARS} characters before the @)"
        )
    return None


def split_tags(value: str | None) -> tuple[list[str] | None, str | None]:
    """Tags split on `;` or `,`, trimmed, empties and repeats dropped; or the problem."""
    if value is None:
        return None, None
    tags = list(dict.fromkeys(filter(None, map(str.strip, value.replace(";", ",").split(",")))))
    if len(tags) > MAX_TAGS:
        return None, f"tags: more than {MAX_TAGS} tags"
    if any(len(tag) > MAX_TAG_CHARS for tag in tags):
        return None, f"tags: a tag is longer than {MAX_TAG_CHARS} characters"
    return tags or None, None


class Validator:
    """Validates batches of `(row_number, fields)` for one file's header."""

    def __init__(self, header_map: HeaderMap) -> None:
        self.header_map = header_map
        present = [name for name in CANONICAL_COLUMNS if name in header_map.indexes]
        positions = [header_map.indexes[name] for name in present]
        # itemgetter returns a bare value for one index; keep the result a sequence.
        self._pick: Callable[[Sequence[str]], Sequence[str]] = (
            itemgetter(*positions) if len(positions) > 1 else _one(positions[0])
        )
        self._missing_slots = [
            slot for slot, name in enumerate(CANONICAL_COLUMNS) if name not in header_map.indexes
        ]
        # The column name each field's problems are reported under.
        self._field_names = [header_map.payload_keys[index] for index in range(header_map.width)]
        for name, index in header_map.indexes.items():
            self._field_names[index] = name

    def validate(self, batch: Sequence[NumberedRow]) -> ValidatedBatch:
        """Split a batch into valid rows and row errors, in file order within each list."""
        rows: list[ContactRow] = []
        errors: list[RowError] = []
        width = self.header_map.width
        pick = self._pick
        missing = self._missing_slots
        fields_in_batch = chain.from_iterable(fields for _, fields in batch)
        nul_in_batch = "\x00" in "\x1f".join(fields_in_batch)
        for number, fields in batch:
            if nul_in_batch or len(fields) != width or max(map(len, fields)) > _FAST_MAX_CHARS:
                checked = self._check_row(number, fields)
                if isinstance(checked, ContactRow):
                    rows.append(checked)
                else:
                    errors.append(checked)
                continue
            values: list[str | None] = [value or None for value in map(str.strip, pick(fields))]
            for slot in missing:
                values.insert(slot, None)
            email = values[0]
            # Fields here are <= 64 characters, so the RFC length limits cannot be exceeded.
            if email is None or not _is_email(email):
                errors.append(self._error(number, fields, [email_problem(email) or "?"]))
                continue
            tags, problem = split_tags(values[9])
            if problem:
                errors.append(self._error(number, fields, [problem]))
                continue
            rows.append(_contact(number, email, values, tags))
        return ValidatedBatch(rows, errors)

    def _check_row(self, number: int, fields: list[str]) -> ContactRow | RowError:
        """Every rule, for rows off the fast path; collects all the row's problems."""
        width = self.header_map.width
        problems: list[str] = []
        extras = [index for index in range(width, len(fields)) if fields[index].strip()]
        if extras:
            problems.append(f"row has {extras[-1] + 1} fields, the header has {width}")
        for index, value in enumerate(fields):
            name = self._field_names[index] if index < width else f"column {index + 1}"
            if "\x00" in value:
                problems.append(f"{name}: contains a NUL byte")
            if len(value) > MAX_FIELD_CHARS and name not in MAX_CHARS:
                problems.append(f"{name}: longer than {MAX_FIELD_CHARS} characters")
        padded = list(fields[:width]) + [""] * (width - len(fields))
        values: list[str | None] = [value or None for value in map(str.strip, self._pick(padded))]
        for slot in self._missing_slots:
            values.insert(slot, None)
        for name, cleaned in zip(CANONICAL_COLUMNS, values, strict=True):
            if cleaned is not None and len(cleaned) > MAX_CHARS[name] and name != "email":
                problems.append(f"{name}: longer than {MAX_CHARS[name]} characters")
        if problem := email_problem(values[0]):
            problems.append(problem)
        tags, problem = split_tags(values[9])
        if problem:
            problems.append(problem)
        email = values[0]
        if problems or email is None:
            return self._error(number, fields, problems)
        return _contact(number, email, values, tags)

    def _error(self, number: int, fields: Sequence[str], problems: list[str]) -> RowError:
        payload = {
            self.header_map.payload_key(index): _payload_value(value)
            for index, value in enumerate(fields)
        }
        return RowError(number, "; ".join(problems), payload)


def _contact(
    number: int, email: str, values: list[str | None], tags: list[str] | None
) -> ContactRow:
    _, first_name, last_name, phone, company, job_title, city, country, linkedin_url, _ = values
    return ContactRow(
        number,
        email.lower(),
        first_name,
        last_name,
        phone,
        company,
        job_title,
        city,
        country,
        linkedin_url,
        tags,
    )


def _payload_value(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL: show it as the visible U+2400 symbol.
    if "\x00" in value:
        value = value.replace("\x00", "\u2400")
    if len(value) > MAX_PAYLOAD_VALUE_CHARS:
        return f"{value[:MAX_PAYLOAD_VALUE_CHARS]}\u2026 ({len(value)} characters)"
    return value


def _one(index: int) -> Callable[[Sequence[str]], Sequence[str]]:
    return lambda fields: (fields[index],)
