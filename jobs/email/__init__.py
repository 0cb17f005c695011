"""Email jobs: transactional sends, the waitlist campaign and trial notices (CONTRACT §5).

`templates` renders each email (HTML and text); providers live in `worker.email_providers`,
the shared send-rate limit in `worker.ratelimit`.
"""
