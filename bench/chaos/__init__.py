"""The chaos soak (`make chaos`, issue #14): a mixed workload while faults hit at random.

It provisions a world of its own (bench/chaos/env.py): a PostgreSQL database, a redis-server
on a free loopback port, the fake Resend/SendGrid server and moto's S3, import files in a temp
dir. Five real `python -m worker work QUEUE` processes (bench/chaos/workers.py) serve it while
the driver (bench/chaos/driver.py) enqueues, through `JobsClient`, the workload of
bench/chaos/workload.py: imports from several users (local files and S3), exports, 20,000
emails (`send_email` bursts and a waitlist campaign), a marketing sync. Meanwhile the injector
(bench/chaos/faults.py) SIGKILLs a worker every 20-60 s, restarts Redis once (kill -9, back
empty), and terminates the database's backends in bursts. Then it waits for quiescence and
checks every invariant (bench/chaos/checks.py), printing a table and writing it as markdown.
"""
