"""`assert_shape(result, ExportResult)`: a job's result has exactly its TypedDict's keys.

mypy checks the keys a job's code writes into its result; this checks, at run time, the dict
the job really returned, so a key added (or misspelt) past the type fails a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, Required, get_origin, get_type_hints, is_typeddict


def keys_of(shape: Any) -> tuple[set[str], set[str]]:
    """The TypedDict `shape`'s required and optional keys.

    Python 3.11 reads `NotRequired[...]` only from evaluated annotations; under
    `from __future__ import annotations` (every module here) its `__required_keys__` counts
    such a key as required, so the hints are evaluated to sort them.
    """
    assert is_typeddict(shape), shape
    required, optional = set(shape.__required_keys__), set(shape.__optional_keys__)
    for key, hint in get_type_hints(shape, include_extras=True).items():
        if get_origin(hint) is NotRequired:
            required.discard(key)
            optional.add(key)
        elif get_origin(hint) is Required:
            optional.discard(key)
            required.add(key)
    return required, optional


def assert_shape(result: Mapping[str, object], shape: Any) -> None:
    """Every required key of the TypedDict `shape` is in `result`, and no key outside it.

    `shape` is typed Any: a TypedDict class has no type of its own to annotate it with.
    """
    required, optional = keys_of(shape)
    keys = set(result)
    assert required <= keys, f"{shape.__name__} lacks {sorted(required - keys)}"
    assert keys <= required | optional, f"not in {shape.__name__}: {sorted(keys - required)}"
