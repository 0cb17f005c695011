"""Contact import (CONTRACT §8): `sources` -> `sniff` -> `reader` (`record_parser`, `counting`)
-> `headers`/`validate` (over the contact columns of `columns`), then `merge` (the SQL) and
`checkpoint` (the job row's exactly-once commits), driven by `job.process_contacts_import`.

The parsing modules are pure (no database): they turn an async byte stream into validated rows.
"""

from jobs.imports.job import process_contacts_import

JOBS = [process_contacts_import]

__all__ = ["JOBS", "process_contacts_import"]
