"""Client cost of httpx's default transport vs httpx-aiohttp, against a 200 ms loopback provider.

    .venv/bin/python bench/bench_http.py [--delay-ms 200] [--in-flight 100 500] [--rounds 3]

The fake provider (tests/support/provider_server.py) runs in its own process, so the CPU time
measured here is the client's alone. Each configuration sends `in_flight x rounds` Resend-shaped
POSTs with exactly `in_flight` outstanding at a time, on a pool as large as `in_flight` (the
pool is not the bound being measured). Prints req/s and client CPU ms per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.http import TransportName, make_http_client  # noqa: E402

PAYLOAD = {
    "from": "Contact360 <no-reply@contact360.test>",
    "to": ["ada@example.com"],
    "subject": "Welcome to Contact360",
    "html": "<p>Hi Ada,</p>" + "<p>Your account is ready.</p>" * 20,
    "text": "Hi Ada,\n\nYour account is ready.\n",
}


async def run_one(
    base_url: str, transport: TransportName, in_flight: int, rounds: int
) -> dict[str, float]:
    total = in_flight * rounds
    failures = 0
    sem = asyncio.Semaphore(in_flight)
    async with make_http_client(
        transport=transport,
        max_connections=in_flight,
        max_keepalive_connections=in_flight,
        timeout=httpx.Timeout(60.0),
    ) as http:

        async def one(i: int) -> None:
            nonlocal failures
            async with sem:
                response = await http.post(
                    f"{base_url}/emails",
                    json=PAYLOAD,
                    headers={"Authorization": "Bearer bench", "Idempotency-Key": f"bench/{i}"},
                )
                if response.status_code != 200:
                    failures += 1

        # Warm the pool so connection setup is not billed to the first round only.
        await asyncio.gather(*(one(-i - 1) for i in range(min(in_flight, 50))))
        cpu_start_s = time.process_time()
        wall_start_s = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        wall_s = time.perf_counter() - wall_start_s
        cpu_s = time.process_time() - cpu_start_s
    return {
        "requests": total,
        "failures": failures,
        "req_per_s": total / wall_s,
        "cpu_ms_per_req": cpu_s * 1000 / total,
        "wall_s": wall_s,
    }


def start_server(delay_ms: float) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.provider_server", "--delay-ms", str(delay_ms)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert server.stdout is not None
    base_url = server.stdout.readline().strip()
    if not base_url.startswith("http://127.0.0.1:"):
        server.kill()
        raise SystemExit(f"provider server did not start (said {base_url!r})")
    return server, base_url


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--transports", nargs="+", default=["httpx", "aiohttp"], choices=["httpx", "aiohttp"]
    )
    args = parser.parse_args()

    server, base_url = start_server(args.delay_ms)
    try:
        print(
            f"loopback provider answering in {args.delay_ms:g} ms; "
            f"{args.rounds} rounds per configuration; python {sys.version.split()[0]}, "
            f"httpx {httpx.__version__}"
        )
        print(f"{'transport':<10} {'in flight':>9} {'requests':>8} {'req/s':>8} {'CPU ms/req':>10}")
        for in_flight in args.in_flight:
            for transport in args.transports:
                r = await run_one(base_url, transport, in_flight, args.rounds)
                note = f"  ({r['failures']:.0f} failed)" if r["failures"] else ""
                print(
                    f"{transport:<10} {in_flight:>9} {r['requests']:>8.0f} "
                    f"{r['req_per_s']:>8.1f} {r['cpu_ms_per_req']:>10.2f}{note}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
