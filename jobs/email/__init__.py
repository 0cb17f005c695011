"""Email jobs: transactional sends, the waitlist campaign, trial notices, webhook events (§5, §13).

Every email goes through the outbox (`outbox.deliver`): one row per logical email, claimed
before the provider call, so a job that runs twice sends once; the process's batcher
(`batcher`, `flush`, `claims`, `exchange`) sends concurrent drafts together, up to 100 a
Resend request. `templates` renders each email (HTML and text); providers live in
`worker.email_providers`, the shared send-rate limit in `worker.ratelimit`.
"""

from __future__ import annotations

from jobs.email.campaign import kickoff_waitlist_first_email, send_waitlist_campaign_hourly
from jobs.email.events import process_email_events
from jobs.email.transactional import send_email, send_welcome_email
from jobs.email.trials import check_trial_expirations
from worker.job import CronSchedule

JOBS = [
    send_email,
    send_welcome_email,
    kickoff_waitlist_first_email,
    send_waitlist_campaign_hourly,
    check_trial_expirations,
    process_email_events,
]
# UTC (worker.main sets arq's timezone). Trials at half past, so the two crons do not start
# their database scans and sends in the same second.
CRON_JOBS = [
    CronSchedule(send_waitlist_campaign_hourly, minute=0),
    CronSchedule(check_trial_expirations, minute=30),
]
