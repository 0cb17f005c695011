"""Write a deterministic contacts CSV for benchmarks: the canonical columns, messy like life.

    python bench/make_contacts_csv.py OUT.csv --rows 1000000 [--seed 1]

About 2% of rows carry an invalid email and about 1% repeat an earlier email (half of those in
another case or with spaces around it). Rows average ~120 bytes; the file is streamed out in
blocks, so memory stays flat whatever `--rows` is.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from jobs.imports.columns import CANONICAL_COLUMNS

HEADER = CANONICAL_COLUMNS  # the names the importer maps without aliases
FIRST = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kara",
    "Liam",
    "Mia",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Xena",
    "Yusuf",
    "Zoë",
    "José",
    "Chloé",
    "Søren",
    "Łukasz",
    "Aiyana",
    "Mei",
    "Hiroshi",
    "Fatima",
]
LAST = [
    "Smith",
    "Jones",
    "Miller",
    "Garcia",
    "Brown",
    "Wilson",
    "Moore",
    "Taylor",
    "Martin",
    "Lee",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Müller",
    "Schmidt",
    "Dubois",
    "Rossi",
    "Silva",
    "Nowak",
    "Kowalski",
    "Novák",
    "Horvat",
    "Jensen",
    "Sato",
    "王",
    "Haddad",
]
COMPANIES = (
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella Ltd",
    "Stark Industries",
    "Wayne Enterprises",
    "Hooli",
    "Pied Piper",
    "Vandelay Industries",
    "Soylent GmbH",
    "Tyrell Corp.",
    "Cyberdyne Systems",
    "",
)
TITLES = (
    "CEO",
    "CTO",
    "Head of Sales",
    "Account Executive",
    "Software Engineer",
    "Marketing Manager",
    "Product Owner",
    "Recruiter",
    "",
)
PLACES = (
    ("Berlin", "Germany"),
    ("Paris", "France"),
    ("London", "United Kingdom"),
    ("New York", "USA"),
    ("São Paulo", "Brazil"),
    ("Kraków", "Poland"),
    ("Tokyo", "Japan"),
    ("Toronto", "Canada"),
    ("", ""),
)
DOMAINS = ("gmail.com", "example.com", "outlook.com", "acme.io", "mail.example.org", "web.de")
TAGS = ("lead", "customer", "vip", "newsletter", "partner", "event-2026", "churned")
BAD_EMAILS = (
    "no-at-sign.example.com",
    "two@@example.com",
    "has space@example.com",
    "trailing.dot@example.com.",
    "",
    "ünïcode@exämple.com",
    "@missing-local.com",
)
BLOCK_ROWS = 10_000


def _blocks(rows: int, seed: int) -> Iterator[list[list[str]]]:
    """Rows in blocks of BLOCK_ROWS, so the writer streams them out."""
    rng = random.Random(seed)
    recent: list[str] = []
    for start in range(0, rows, BLOCK_ROWS):
        block: list[list[str]] = []
        for index in range(start, min(rows, start + BLOCK_ROWS)):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            roll = rng.random()
            if roll < 0.02:
                email = rng.choice(BAD_EMAILS)
            elif roll < 0.03 and recent:
                email = rng.choice(recent)
                if rng.random() < 0.5:
                    email = f"  {email.upper()} "
            else:
                email = f"{_ascii(first)}.{_ascii(last)}{index}@{rng.choice(DOMAINS)}".lower()
                if len(recent) < 1000:
                    recent.append(email)
                else:
                    recent[rng.randrange(1000)] = email
            city, country = rng.choice(PLACES)
            tags = ";".join(rng.sample(TAGS, rng.randrange(3))) if rng.random() < 0.5 else ""
            # By name, written in HEADER's order: the rng draws stay in the order they always
            # had, so a seed gives the same file.
            values = {
                "email": email,
                "first_name": first,
                "last_name": last,
                "phone": (
                    f"+{rng.randrange(1, 50)} {rng.randrange(100, 999)} {rng.randrange(10**6):06}"
                ),
                "company": rng.choice(COMPANIES),
                "job_title": rng.choice(TITLES),
                "city": city,
                "country": country,
                "linkedin_url": f"https://linkedin.com/in/{_ascii(first).lower()}-{index:x}",
                "tags": tags,
            }
            block.append([values[name] for name in HEADER])
        yield block


def _ascii(name: str) -> str:
    return name.encode("ascii", "ignore").decode() or "x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    started_s = time.perf_counter()
    with args.out.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(HEADER)
        for block in _blocks(args.rows, args.seed):
            writer.writerows(block)
    elapsed_s = time.perf_counter() - started_s
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.rows} rows, {size_mb:.1f} MB, in {elapsed_s:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
