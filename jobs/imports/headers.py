"""Map a CSV header onto the canonical contact columns (CONTRACT §8 aliases, in `columns`).

Names match case-insensitively, ignoring white space, `-` and `_`, so "E-mail", "e_mail" and
"EMAIL" are one column. The first column that maps to a canonical name wins; a later one
("Mobile" after "Phone") is ignored and reported, like an unknown column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.imports.columns import COLUMNS
from jobs.imports.sniff import FileFormatError

ALIASES: dict[str, str] = {alias: column.name for column in COLUMNS for alias in column.aliases}

_IGNORED_IN_NAMES = re.compile(r"[\s\-_\ufeff]+")
_MAX_LISTED_HEADERS = 30
_MAX_HEADER_CHARS = 60


def normalize_header(name: str) -> str:
    """The key a header name is matched by: no spaces, `-` or `_`, case-folded."""
    return _IGNORED_IN_NAMES.sub("", name).casefold()


def display_name(name: str) -> str:
    """A header name safe to show in a message or store in PostgreSQL (no NUL, bounded)."""
    name = name.strip().replace("\x00", "\u2400")
    return name if len(name) <= _MAX_HEADER_CHARS else name[: _MAX_HEADER_CHARS - 1] + "\u2026"


@dataclass(frozen=True)
class HeaderMap:
    """Where each canonical column is in the file, and what is ignored."""

    header: tuple[str, ...]
    indexes: dict[str, int]  # canonical name -> column index, only for columns present
    unknown_columns: tuple[str, ...]  # header names that match no canonical column
    duplicate_columns: tuple[str, ...]  # header names of a canonical column already present
    payload_keys: tuple[str, ...]  # unique display names, one per header column

    @property
    def width(self) -> int:
        return len(self.header)


def map_header(header: Sequence[str]) -> HeaderMap:
    """Map the header; FileFormatError (listing the headers found) if it has no email column."""
    indexes: dict[str, int] = {}
    unknown: list[str] = []
    duplicates: list[str] = []
    for index, name in enumerate(header):
        canonical = ALIASES.get(normalize_header(name))
        if canonical is None:
            if name.strip():
                unknown.append(display_name(name))
        elif canonical in indexes:
            duplicates.append(display_name(name))
        else:
            indexes[canonical] = index
    if "email" not in indexes:
        raise FileFormatError(
            'the file has no email column (a header such as "email" or "E-mail"); '
            f"the headers found are: {list_names(header)}"
        )
    return HeaderMap(
        header=tuple(header),
        indexes=indexes,
        unknown_columns=tuple(unknown),
        duplicate_columns=tuple(duplicates),
        payload_keys=_payload_keys(header),
    )


def list_names(names: Sequence[str]) -> str:
    """Header names for a message: the first 30, then "and K more" (a file may have 5,000)."""
    listed = ", ".join(display_name(name) or "(blank)" for name in names[:_MAX_LISTED_HEADERS])
    if len(names) > _MAX_LISTED_HEADERS:
        listed += f" and {len(names) - _MAX_LISTED_HEADERS} more"
    return listed


def _payload_keys(header: Sequence[str]) -> tuple[str, ...]:
    """Display names made unique: blank -> "column N", a repeated name -> "Name (column N)"."""
    keys: list[str] = []
    seen: set[str] = set()
    for index, name in enumerate(header):
        key = display_name(name) or f"column {index + 1}"
        if key in seen:
            key = f"{key} (column {index + 1})"
        seen.add(key)
        keys.append(key)
    return tuple(keys)
