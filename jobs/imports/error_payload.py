"""A row error's `payload` as JSON text, bounded whatever the row (CONTRACT §8 row errors).

A record may be up to 16 MiB (`record_parser.MAX_RECORD_CHARS`): 200,000 delimiters made a
payload of 200,000 keys and 4 MB of JSON. So the payload keeps at most the header's width of
fields, each value clipped to `MAX_PAYLOAD_VALUE_CHARS`, and stops adding fields at
`MAX_PAYLOAD_BYTES`; one last entry says how many fields were left out. The JSON is built here,
on the import's parsing thread (the validator runs there), so the event loop only sends the text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

MAX_PAYLOAD_VALUE_CHARS = 1024  # an error row never stores a 200 KB cell
# 8 KiB shows a typical row whole (ten columns of ~100 bytes) and any one clipped value (at
# most ~6 KiB escaped), while IMPORT_MAX_STORED_ERRORS (1,000) rows stay under 8 MiB per import
# and an `import_errors(limit=100)` answer under 1 MiB.
MAX_PAYLOAD_BYTES = 8 * 1024
MORE_FIELDS_KEY = "\u2026"  # "…"; made unique when a header has that name too
# Room kept for the last entry: '"…": "999,999,999 more fields"' with its separator.
_MORE_ENTRY_BYTES = 48

_dumps = json.JSONEncoder(ensure_ascii=False).encode


def payload_json(keys: Sequence[str], fields: Sequence[str]) -> str:
    """`{key: value}` of the row's first fields (one per key, within the caps), as JSON text.

    `keys` are the header's unique display names; fields past them, and fields that would take
    the text over `MAX_PAYLOAD_BYTES`, are counted in one `MORE_FIELDS_KEY` entry instead.
    """
    items: list[str] = []
    size_bytes = 2  # the braces
    budget_bytes = MAX_PAYLOAD_BYTES - _MORE_ENTRY_BYTES
    for key, value in zip(keys, fields, strict=False):  # stops at the header's width
        item = f"{_dumps(key)}: {_dumps(clip_value(value))}"
        item_bytes = len(item.encode()) + 2  # and ", "
        if size_bytes + item_bytes > budget_bytes:
            break
        items.append(item)
        size_bytes += item_bytes
    left_out = len(fields) - len(items)
    if left_out:
        more_key = MORE_FIELDS_KEY
        while more_key in keys[: len(items)]:  # a header may be called "…" too
            more_key += MORE_FIELDS_KEY
        noun = "field" if left_out == 1 else "fields"
        items.append(f"{_dumps(more_key)}: {_dumps(f'{left_out:,} more {noun}')}")
    return "{" + ", ".join(items) + "}"


def clip_value(value: str) -> str:
    """`value` as stored in a payload: clipped, with NUL (which jsonb cannot hold) made visible."""
    if len(value) > MAX_PAYLOAD_VALUE_CHARS:
        value = f"{value[:MAX_PAYLOAD_VALUE_CHARS]}\u2026 ({len(value)} characters)"
    # PostgreSQL text and jsonb cannot hold NUL: show it as the visible U+2400 symbol.
    return value.replace("\x00", "\u2400") if "\x00" in value else value
