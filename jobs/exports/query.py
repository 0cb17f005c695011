"""The SELECTs an export streams through `COPY (...) TO STDOUT WITH (FORMAT csv, HEADER)`.

Every text cell goes through `csv_safe()` (migration 0002, the SQL twin of
`csv_format.neutralize`), so the bytes PostgreSQL sends are already the final CSV and the worker
only moves them to storage: no row is ever parsed or held in Python. Ids and timestamps are
rendered by PostgreSQL and cannot start a formula, so they skip `csv_safe()`.

Ownership is enforced here, in the WHERE clause, whatever the selection holds: `user_id` is a
query parameter on every table the rows come from, the company joined to a contact included (a
contact's `company_id` can only point at its owner's company today, but the export must not
depend on that). A selection (`exports.has_selection`) is a semi-join on `export_items`, so ids
of another user or of deleted rows simply match nothing.

No ORDER BY: rows come in the table's physical order (about insertion order). Sorting 10^6
export rows spills to disk at the default work_mem and cost ~30% of the COPY's speed
(bench/bench_export.py), for an order the contract does not ask for and a spreadsheet redoes.

Parameters: `$1` the export's user id, `$2` the export id (only used with a selection).
"""

from __future__ import annotations

from db.models import ExportKind
from jobs.exports.csv_format import COMPANY_COLUMNS, CONTACT_COLUMNS, tags_sql, timestamp_sql
from jobs.imports.columns import TEXT_COLUMNS

_SELECTION = "AND {alias}.id IN (SELECT item_id FROM export_items WHERE export_id = $2)"


def _safe(column_sql: str) -> str:
    return f"csv_safe({column_sql})"


def contacts_query(*, has_selection: bool) -> str:
    """Contacts of user `$1` (only the ids selected for export `$2` when `has_selection`)."""
    # The imported columns (`jobs.imports.columns`) as stored, but the company by its name.
    text_cells = {name: _safe(f"c.{name}") for name in TEXT_COLUMNS}
    cells = {
        "id": "c.id::text",
        "email": _safe("c.email"),
        **text_cells,
        "company": _safe("co.name"),
        # Neutralised after joining: a first tag `=cmd` must not start the cell as a formula.
        # nullif: no tags (`{}`) is an empty cell like NULL, not a quoted `""`.
        "tags": _safe(f"nullif({tags_sql('c.tags')}, '')"),
        "created_at": timestamp_sql("c.created_at"),
        "updated_at": timestamp_sql("c.updated_at"),
    }
    selection = _SELECTION.format(alias="c") if has_selection else ""
    return (
        f"SELECT {_select_list(cells, CONTACT_COLUMNS)} "
        "FROM contacts c "
        "LEFT JOIN companies co ON co.id = c.company_id AND co.user_id = $1 "
        f"WHERE c.user_id = $1 {selection}"
    )


def companies_query(*, has_selection: bool) -> str:
    """Companies of user `$1` with their contacts count (selected ids of `$2` if given)."""
    cells = {
        "id": "co.id::text",
        "name": _safe("co.name"),
        "domain": _safe("co.domain"),
        "contacts_count": "coalesce(n.contacts_count, 0)",
        "created_at": timestamp_sql("co.created_at"),
        "updated_at": timestamp_sql("co.updated_at"),
    }
    selection = _SELECTION.format(alias="co") if has_selection else ""
    # One grouped pass over the user's contacts instead of a count per company: the same plan
    # for 10 companies or 100,000.
    counts = (
        "SELECT company_id, count(*) AS contacts_count FROM contacts "
        "WHERE user_id = $1 AND company_id IS NOT NULL GROUP BY company_id"
    )
    return (
        f"SELECT {_select_list(cells, COMPANY_COLUMNS)} "
        "FROM companies co "
        f"LEFT JOIN ({counts}) n ON n.company_id = co.id "
        f"WHERE co.user_id = $1 {selection}"
    )


def export_query(kind: ExportKind, *, has_selection: bool) -> str:
    if kind == "contacts":
        return contacts_query(has_selection=has_selection)
    return companies_query(has_selection=has_selection)


def _select_list(cells: dict[str, str], columns: tuple[str, ...]) -> str:
    # Built from the column tuple of csv_format, so the header order is §9's by construction.
    return ", ".join(f"{cells[name]} AS {name}" for name in columns)
