"""The soak's table, as text for the terminal and as markdown for README."""

from __future__ import annotations

from bench.chaos.checks import Row


def render(rows: list[Row], title: str) -> tuple[str, str, bool]:
    """(text, markdown, every must-be-zero row is zero)."""
    ok = all(row.ok for row in rows)
    width = max(len(row.what) for row in rows)
    lines = [f"chaos soak: {title}", ""]
    markdown = [
        f"Chaos soak ({title}): {'PASS' if ok else 'FAIL'}",
        "",
        "| area | check | count | must be 0 |",
        "|---|---|---|---|",
    ]
    for row in rows:
        verdict = ("ok" if row.ok else "FAIL") if row.must_be_zero else ""
        lines.append(f"{row.section:<10}{row.what:<{width}}  {row.value:>9,}  {verdict}")
        must = ("yes" if row.ok else "**yes: FAILED**") if row.must_be_zero else ""
        markdown.append(f"| {row.section} | {row.what} | {row.value:,} | {must} |")
    lines += [
        "",
        "PASS: nothing lost, duplicated or left behind" if ok else "FAIL: see the rows marked FAIL",
    ]
    return "\n".join(lines), "\n".join(markdown) + "\n", ok
