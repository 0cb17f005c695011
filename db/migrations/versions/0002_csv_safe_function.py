"""csv_safe(text): formula-injection neutralisation for exports, inside PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Exports stream `COPY (SELECT csv_safe(...)) TO STDOUT` straight to storage: neutralising in SQL
keeps them at ~0.6x a bare COPY, where a Python pass over every cell reaches ~0.2x. The text is
`jobs.exports.csv_format.NEUTRALIZE_FUNCTION_SQL` as of this revision, copied (not imported) so
the migration never changes under a database that already ran it; a test checks they agree.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Non-ASCII characters are escaped: they are the ones NFKC turns into a formula trigger.
CSV_SAFE_SQL = (
    "CREATE OR REPLACE FUNCTION csv_safe(cell text) RETURNS text\nLANGUAGE sql IMMUTABLE PA"
    "RALLEL SAFE\nAS $csv_safe$ SELECT CASE WHEN (ascii((cell)) - 65) >> 6 = 0 THEN (cell) "
    "WHEN ascii((cell)) BETWEEN 48 AND 57 THEN (cell) WHEN ascii((cell)) > 128 AND (cell) !"
    "~ '^[\xa0\xa8\xaf\xb4\xb8\u02d8\u02d9\u02da\u02db\u02dc\u02dd\u037a\u0384\u0385\u1fbd"
    "\u1fbf\u1fc0\u1fc1\u1fcd\u1fce\u1fcf\u1fdd\u1fde\u1fdf\u1fed\u1fee\u1ffd\u1ffe\u2000"
    "\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2017\u202f\u203e\u205f"
    "\u207a\u207c\u208a\u208c\u2a75\u2a76\u3000\u309b\u309c\ufb29\ufc5e\ufc5f\ufc60\ufc61"
    "\ufc62\ufc63\ufe49\ufe4a\ufe4b\ufe4c\ufe62\ufe63\ufe66\ufe6b\ufe70\ufe72\ufe74\ufe76"
    "\ufe78\ufe7a\ufe7c\ufe7e\uff0b\uff0d\uff1d\uff20\uffe3]' THEN (cell) WHEN (cell) ~ '^ "
    "*[+-]?[0-9 ().-]+$' THEN (cell) WHEN octet_length((cell)) = char_length((cell)) THEN C"
    "ASE WHEN (cell) ~ '^ *[=+@\\t\\r\\n-]' THEN '''' || (cell) ELSE (cell) END WHEN ((cell"
    ") ~ '^ *[=+@\\t\\r\\n-]' OR ltrim(normalize((cell), NFKC), ' ') ~ '^[=+@\\t\\r\\n-]') "
    "AND ltrim(normalize((cell), NFKC), ' ') !~ '^[+-]?[0-9 ().-]+$' THEN '''' || (cell) EL"
    "SE (cell) END $csv_safe$"
)


def upgrade() -> None:
    op.execute(CSV_SAFE_SQL)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS csv_safe(text)")
