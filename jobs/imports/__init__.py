"""Contact import (CONTRACT §8): `sources` -> `sniff` -> `reader` -> `headers`/`validate`.

The modules here are pure (no database): they turn an async byte stream into validated rows.
"""
