"""Measure the import's parsing side: reader only, counting pass, reader + validator.

    python bench/bench_parse.py FILE [--batch-rows 5000] [--repeat 3]

Prints rows/s (median of --repeat runs) and the longest time the event loop was blocked,
seen by a ticker task that sleeps 1 ms and records how late it wakes up. A bare `csv.reader`
over the same file is the yardstick (ratios hold across machines, absolute figures drift).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from jobs.imports.headers import map_header
from jobs.imports.reader import CsvReader
from jobs.imports.sources import local_file_source
from jobs.imports.validate import Validator

TICK_S = 0.001


async def _max_block_ms(work: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    """Run `work`; return (rows, seconds, longest event-loop block in ms)."""
    longest_s = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest_s
        while not done.is_set():
            before_s = time.perf_counter()
            await asyncio.sleep(TICK_S)
            longest_s = max(longest_s, time.perf_counter() - before_s - TICK_S)

    tick_task = asyncio.create_task(ticker())
    started_s = time.perf_counter()
    rows = await work()
    elapsed_s = time.perf_counter() - started_s
    done.set()
    await tick_task
    return rows, elapsed_s, longest_s * 1000


def _csv_baseline(path: Path) -> int:
    with path.open(encoding="utf-8", newline="") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


async def _read_only(path: Path, batch_rows: int, in_thread: bool) -> int:
    reader = await CsvReader.open(local_file_source(path), parse_in_thread=in_thread)
    rows = 0
    async for batch in reader.batches(max_rows=batch_rows):
        rows += len(batch)
    return rows


async def _count(path: Path, in_thread: bool) -> int:
    reader = await CsvReader.open(local_file_source(path), parse_in_thread=in_thread)
    return await reader.count_rows()


async def _read_validate(path: Path, batch_rows: int, in_thread: bool) -> int:
    reader = await CsvReader.open(local_file_source(path), parse_in_thread=in_thread)
    validator = Validator(map_header(reader.header))
    valid = errors = 0
    async for batch in reader.batches(max_rows=batch_rows):
        result = validator.validate(batch)
        valid += len(result.rows)
        errors += len(result.errors)
    return valid + errors


async def main_async(path: Path, batch_rows: int, repeat: int) -> None:
    cases: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("csv.reader, sync (yardstick)", lambda: asyncio.to_thread(_csv_baseline, path)),
    ]
    for in_thread in (False, True):
        where = "parse in thread" if in_thread else "parse inline"
        cases += [
            (f"reader only, {where}", lambda t=in_thread: _read_only(path, batch_rows, t)),
            (f"count_rows, {where}", lambda t=in_thread: _count(path, t)),
            (f"reader+validator, {where}", lambda t=in_thread: _read_validate(path, batch_rows, t)),
        ]
    print(f"{'case':<36} {'rows':>9} {'rows/s':>9} {'max block ms':>13}")
    for name, work in cases:
        runs = [await _max_block_ms(work) for _ in range(repeat)]
        rows = runs[0][0]
        rate = statistics.median(rows / elapsed_s for _, elapsed_s, _ in runs)
        block_ms = max(block for _, _, block in runs)
        print(f"{name:<36} {rows:>9} {rate:>9,.0f} {block_ms:>13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.file, args.batch_rows, args.repeat))


if __name__ == "__main__":
    main()
