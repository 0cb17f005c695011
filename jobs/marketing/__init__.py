"""Marketing jobs: `sync_contact(email)` and the daily `sync_all_contacts` (CONTRACT §5).

With `MARKETING_PROVIDER=none` both log and return without reading anything.
"""

from __future__ import annotations

from jobs.marketing.sync import sync_all_contacts, sync_contact
from worker.job import CronSchedule

JOBS = [sync_contact, sync_all_contacts]
# Daily at 03:15 UTC: a quiet hour, and not on the minute the hourly email crons start.
CRON_JOBS = [CronSchedule(sync_all_contacts, hour=3, minute=15)]
