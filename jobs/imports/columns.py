"""The contact columns a CSV import reads and stores (CONTRACT §8), written out once.

Every list of them derives from `COLUMNS`: the header aliases (`headers`), the length limits
(`validate`), the staging table, its COPY and the merge (`merge`), the export's contact cells
(`jobs.exports.query`) and the benchmark's generated file. `validate.ContactRow` spells the same
names out for the type checker, `row_number` first; tests/imports/test_columns.py keeps it, the
staging table and the merge in step with this definition.

The order is the staging table's and `ContactRow`'s. Email comes first (the key every row must
have) and tags last (the one array); the validator's fast path and the COPY encoder rely on
that, and everything between is plain optional text (`TEXT_COLUMNS`).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_FIELD_CHARS = 64 * 1024  # any field, any column (also ignored ones)


@dataclass(frozen=True)
class ContactColumn:
    name: str  # the canonical header, the staging column and `ContactRow`'s field
    max_chars: int  # the longest value accepted, after trimming
    aliases: tuple[str, ...]  # header names that map to it, as `headers.normalize_header` keys
    staging_type: str = "text"
    stored_as: str | None = None  # the `contacts` column, where it is not `name`

    @property
    def contacts_column(self) -> str:
        return self.stored_as or self.name


COLUMNS: tuple[ContactColumn, ...] = (
    ContactColumn(
        "email",
        254,  # RFC 5321 path limit (256) minus the angle brackets
        ("email", "emailaddress", "mail", "emailaddr", "primaryemail"),
    ),
    ContactColumn("first_name", 255, ("firstname", "givenname", "forename", "first")),
    ContactColumn("last_name", 255, ("lastname", "surname", "familyname", "last")),
    ContactColumn(
        "phone",
        64,
        (
            "phone",
            "phonenumber",
            "mobile",
            "mobilephone",
            "mobilenumber",
            "cellphone",
            "telephone",
            "tel",
        ),
    ),
    ContactColumn(
        "company",
        255,
        (
            "company",
            "companyname",
            "organization",
            "organisation",
            "organizationname",
            "organisationname",
            "employer",
        ),
        stored_as="company_id",  # the merge upserts the company by name and links its id
    ),
    ContactColumn("job_title", 255, ("title", "jobtitle", "position")),
    ContactColumn("city", 255, ("city", "town")),
    ContactColumn("country", 255, ("country", "countryname", "country/region")),
    ContactColumn(
        "linkedin_url", 2048, ("linkedin", "linkedinurl", "linkedinprofile", "linkedinprofileurl")
    ),
    ContactColumn(
        "tags",
        MAX_FIELD_CHARS,  # bounded per tag and by count instead (`validate.split_tags`)
        ("tags", "tag", "labels"),
        staging_type="text[]",
    ),
)

CANONICAL_COLUMNS: tuple[str, ...] = tuple(column.name for column in COLUMNS)
TEXT_COLUMNS: tuple[str, ...] = CANONICAL_COLUMNS[1:-1]  # between email and tags
