"""Header mapping and row validation: every rule, exact messages, fast and slow paths agreeing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.imports.columns import CANONICAL_COLUMNS
from jobs.imports.error_payload import MORE_FIELDS_KEY
from jobs.imports.headers import map_header
from jobs.imports.reader import CsvReader, FileFormatError
from jobs.imports.record_parser import NumberedRow
from jobs.imports.sources import local_file_source
from jobs.imports.validate import ContactRow, RowError, ValidatedBatch, Validator

HEADER = list(CANONICAL_COLUMNS)


def row(email: str = "a@x.com", **values: str) -> list[str]:
    fields = dict.fromkeys(HEADER, "")
    fields["email"] = email
    fields.update(values)
    return [fields[name] for name in HEADER]


def check(*rows: list[str], header: list[str] = HEADER) -> ValidatedBatch:
    batch: list[NumberedRow] = [(number, fields) for number, fields in enumerate(rows, 2)]
    return Validator(map_header(header)).validate(batch)


def only_error(*rows: list[str], header: list[str] = HEADER) -> RowError:
    result = check(*rows, header=header)
    assert result.rows == []
    assert len(result.errors) == 1
    return result.errors[0]


def payload(error: RowError) -> dict[str, str]:
    decoded: dict[str, str] = json.loads(error.payload_json)
    return decoded


def test_aliases_map_to_canonical_columns() -> None:
    header = [
        "E-mail",
        "Given name",
        "Surname",
        "Mobile",
        "Organization",
        "Job Title",
        " CITY ",
        "country",
        "LinkedIn URL",
        "Tags",
    ]
    mapped = map_header(header)
    assert mapped.indexes == {name: index for index, name in enumerate(CANONICAL_COLUMNS)}
    assert mapped.unknown_columns == ()
    other = map_header(["Email Address", "first_name", "Last-Name", "Phone Number", "Company Name"])
    assert list(other.indexes) == ["email", "first_name", "last_name", "phone", "company"]
    more = map_header(["EMAIL", "Organisation", "Title", "LinkedIn", "Phone", "LINKEDIN_PROFILE"])
    assert more.indexes == {"email": 0, "company": 1, "job_title": 2, "linkedin_url": 3, "phone": 4}
    assert more.duplicate_columns == ("LINKEDIN_PROFILE",)


def test_unknown_and_duplicate_columns_are_reported() -> None:
    mapped = map_header(["email", "Notes", "Phone", "Favourite colour", "Mobile", ""])
    assert mapped.unknown_columns == ("Notes", "Favourite colour")
    assert mapped.duplicate_columns == ("Mobile",)
    assert mapped.indexes == {"email": 0, "phone": 2}


def test_no_email_column_lists_the_headers_found() -> None:
    with pytest.raises(FileFormatError) as caught:
        map_header(["Name", "Phone", "", "Notes"])
    assert str(caught.value) == (
        'the file has no email column (a header such as "email" or "E-mail"); '
        "the headers found are: Name, Phone, (blank), Notes"
    )


def test_a_valid_row_is_trimmed_and_empty_cells_are_none() -> None:
    result = check(row(" Ann@Example.COM ", first_name="  Ann ", city="", tags=" vip "))
    assert result.errors == []
    assert result.rows == [
        ContactRow(2, "ann@example.com", "Ann", None, None, None, None, None, None, None, ["vip"])
    ]


def test_same_email_in_other_case_and_spaces_normalises_equal() -> None:
    result = check(row("  Alice@Example.Com"), row("alice@example.com "), row("ALICE@EXAMPLE.COM"))
    assert [contact.email for contact in result.rows] == ["alice@example.com"] * 3


@pytest.mark.parametrize(
    "email, message",
    [
        ("", "email: missing"),
        ("   ", "email: missing"),
        ("no-at.example.com", "email: not a valid email address"),
        ("a@b@example.com", "email: not a valid email address"),
        ("a b@example.com", "email: not a valid email address"),
        ("ab@exa mple.com", "email: not a valid email address"),
        ("a@example.com.", "email: not a valid email address"),
        ("a@-example.com", "email: not a valid email address"),
        ("a@" + "x" * 64 + ".com", "email: not a valid email address"),  # a 64-char label
        ("user@bücher.de", "email: not a valid email address"),  # WHATWG: punycode only
        ("zoë@example.com", "email: not a valid email address"),
        ("\u212aelvin@example.com", "email: not a valid email address"),  # lower() makes ASCII
        (
            "x" * 65 + "@example.com",
            "email: not a valid email address (more than 64 characters before the @)",
        ),
        ("x" * 64 + "@" + "y" * 63 + "." + "y" * 63 + "." + "y" * 61, None),  # 254: the limit
        (
            "x" * 64 + "@" + "y" * 63 + "." + "y" * 63 + "." + "y" * 62,  # 255
            "email: not a valid email address (longer than 254 characters)",
        ),
    ],
)
def test_email_rules(email: str, message: str | None) -> None:
    result = check(row(email))
    if message is None:
        assert [contact.email for contact in result.rows] == [email.lower()]
    else:
        assert result.rows == []
        assert [error.message for error in result.errors] == [message]


@pytest.mark.parametrize(
    "email", ["a@b", "o'brien+tag@example.co.uk", ".dot@x.com", "a@" + "x" * 63 + ".com"]
)
def test_whatwg_accepts(email: str) -> None:
    assert [contact.email for contact in check(row(email)).rows] == [email.lower()]


def test_ragged_rows() -> None:
    header = ["email", "first_name", "city"]
    result = check(
        ["short@x.com"],
        ["long-empty@x.com", "Ann", "Oslo", "", "  "],
        header=header,
    )
    assert result.errors == []
    assert [(c.email, c.first_name, c.city) for c in result.rows] == [
        ("short@x.com", None, None),
        ("long-empty@x.com", "Ann", "Oslo"),
    ]
    error = only_error(["long@x.com", "Ann", "Oslo", "", "extra", ""], header=header)
    assert error.message == "row has 5 fields, the header has 3"
    assert payload(error) == {
        "email": "long@x.com",
        "first_name": "Ann",
        "city": "Oslo",
        MORE_FIELDS_KEY: "3 more fields",
    }


def test_a_200_kb_field_is_a_row_error_with_a_clipped_payload() -> None:
    big = "x" * 200_000
    header = ["email", "first_name", "notes"]
    error = only_error(["a@x.com", big, ""], header=header)
    assert error.message == "first_name: longer than 255 characters"
    assert payload(error)["first_name"] == "x" * 1024 + "\u2026 (200000 characters)"
    error = only_error(["a@x.com", "Ann", big], header=header)
    assert error.message == "notes: longer than 65536 characters"
    assert payload(error) == {
        "email": "a@x.com",
        "first_name": "Ann",
        "notes": "x" * 1024 + "\u2026 (200000 characters)",
    }


def test_column_length_limits() -> None:
    url = "https://linkedin.com/in/"
    ok = check(row(first_name="n" * 255, phone="1" * 64, linkedin_url=url.ljust(2048, "u")))
    assert len(ok.rows) == 1
    for column, limit in [("first_name", 255), ("phone", 64), ("linkedin_url", 2048)]:
        error = only_error(row(**{column: url.ljust(limit + 1, "v")}))
        assert error.message == f"{column}: longer than {limit} characters"


GOOD_URLS = [
    "https://www.linkedin.com/in/ada",
    "http://linkedin.com/in/ada?trk=x#top",
    "HTTPS://LinkedIn.com/in/ADA",
    "https://user@linkedin.com:443/in/ada",
]
BAD_URLS = [
    "javascript:alert(document.cookie)",
    "JavaScript://linkedin.com/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "ftp://linkedin.com/in/ada",
    "linkedin.com/in/ada",
    "//linkedin.com/in/ada",
    "https://",
    "https:///in/ada",
    "http:/linkedin.com",
    "https:\\\\linkedin.com",
    "https:// linkedin.com",
]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_http_and_https_linkedin_urls_are_kept(url: str) -> None:
    # A trailing empty field takes the row off the fast path: both paths must accept it.
    for fields in (row(linkedin_url=f" {url} "), [*row(linkedin_url=url), ""]):
        assert [contact.linkedin_url for contact in check(fields).rows] == [url]


@pytest.mark.parametrize("url", BAD_URLS)
def test_any_other_linkedin_url_is_a_row_error(url: str) -> None:
    assert only_error(row(linkedin_url=url)).message == "linkedin_url: not an http(s) URL"
    slow = only_error(row(linkedin_url=url, city="c" * 300))
    assert slow.message == "city: longer than 255 characters; linkedin_url: not an http(s) URL"
    assert payload(slow)["linkedin_url"] == url


def test_a_row_lists_ten_problems_and_counts_the_rest() -> None:
    header = ["email", *(f"c{i}" for i in range(30))]
    error = only_error(["a@x.com", *["n\x00l"] * 30], header=header)
    listed = [f"c{i}: contains a NUL byte" for i in range(10)]
    assert error.message == "; ".join([*listed, "and 20 more problems"])


def test_every_problem_of_a_row_is_named() -> None:
    error = only_error(row("", first_name="n" * 256, tags=",".join(f"t{i}" for i in range(51))))
    assert error.message == (
        "email: missing; first_name: longer than 255 characters; tags: more than 50 tags"
    )


def test_nul_byte_is_a_row_error_and_kept_out_of_the_payload() -> None:
    result = check(row(first_name="N\x00ll"), row("ok@x.com"))
    assert [contact.email for contact in result.rows] == ["ok@x.com"]
    assert [(e.row_number, e.message) for e in result.errors] == [
        (2, "first_name: contains a NUL byte")
    ]
    assert payload(result.errors[0])["first_name"] == "N\u2400ll"


def test_tags_split_trimmed_deduplicated_in_order() -> None:
    result = check(row(tags=" vip; lead,vip ,, Customer ;"), row(tags=";,"), row(tags="solo"))
    assert [contact.tags for contact in result.rows] == [
        ["vip", "lead", "Customer"],
        None,
        ["solo"],
    ]
    assert only_error(row(tags="t" * 65)).message == "tags: a tag is longer than 64 characters"
    fifty = ";".join(f"t{i}" for i in range(50))
    assert check(row(tags=fifty)).rows[0].tags == [f"t{i}" for i in range(50)]


def test_formula_like_and_international_values_are_stored_as_given() -> None:
    values = {
        "first_name": "=SUM(A1)",
        "last_name": "+cmd|' /C calc'!A0",
        "company": "@Acme",
        "job_title": "-2+3",
        "city": "مرحبا",
        "country": "中国",
        "tags": "🎉;👩‍💻",
    }
    contact = check(row(**values)).rows[0]
    assert contact._asdict() == {
        "row_number": 2,
        "email": "a@x.com",
        "phone": None,
        "linkedin_url": None,
        **{name: value for name, value in values.items() if name != "tags"},
        "tags": ["🎉", "👩‍💻"],
    }


def test_missing_columns_are_none() -> None:
    result = check(["a@x.com", "t1,t2"], header=["Email", "Tags"])
    assert result.rows == [
        ContactRow(2, "a@x.com", None, None, None, None, None, None, None, None, ["t1", "t2"])
    ]


def test_only_an_email_column() -> None:
    result = check(["B@X.COM"], [""], header=["email"])
    assert [contact.email for contact in result.rows] == ["b@x.com"]
    assert [(e.row_number, e.message, payload(e)) for e in result.errors] == [
        (3, "email: missing", {"email": ""})
    ]


def test_batch_results_keep_file_order_across_fast_and_slow_rows() -> None:
    rows = [
        row("a@x.com"),
        row("bad"),
        row("b@x.com", city="c" * 300),
        row("c@x.com", first_name="x" * 100),  # slow path (long field) but valid
        row("d@x.com"),
        [*row("e@x.com"), "", ""],  # slow path (ragged) but valid
    ]
    result = check(*rows)
    assert [contact.row_number for contact in result.rows] == [2, 5, 6, 7]
    assert [(error.row_number, error.message) for error in result.errors] == [
        (3, "email: not a valid email address"),
        (4, "city: longer than 255 characters"),
    ]


def test_fast_path_agrees_with_row_by_row() -> None:
    rows = [
        row(f"u{i}@x.com", first_name=f"N{i}", tags="a;b" if i % 3 else "", phone=f"+{i}")
        for i in range(30)
    ]
    rows[5] = row("not an email")
    rows[9] = row("x" * 70 + "@x.com")
    rows[11] = row(phone="1" * 65)
    rows[13] = row(tags="t" * 65)
    together = check(*rows)
    validator = Validator(map_header(HEADER))
    singles = [validator.validate([(number, fields)]) for number, fields in enumerate(rows, 2)]
    assert together.rows == [c for single in singles for c in single.rows]
    assert together.errors == [e for single in singles for e in single.errors]
    assert [e.row_number for e in together.errors] == [7, 11, 13, 15]


def test_empty_batch() -> None:
    assert check() == ValidatedBatch([], [])


async def test_reader_and_validator_end_to_end(tmp_path: Path) -> None:
    text = (
        "\ufeffE-mail;Given name;Surname;Organisation;Notes\r\n"
        " Zoe@Example.com ;Zoë;Ünal;ACME;keep\r\n"
        'bad-address;"Multi\r\nline";x;y;z\r\n'
        "\r\n"
        "ok@x.com;;;;\r\n"
    )
    path = tmp_path / "excel.csv"
    path.write_bytes(text.encode("utf-8"))
    reader = await CsvReader.open(local_file_source(path, chunk_size=5), step_bytes=5)
    mapped = map_header(reader.header)
    assert mapped.unknown_columns == ("Notes",)
    validator = Validator(mapped)
    valid: list[ContactRow] = []
    errors: list[RowError] = []
    async for batch in reader.batches(max_rows=2):
        result = validator.validate(batch)
        valid += result.rows
        errors += result.errors
    assert valid == [
        ContactRow(2, "zoe@example.com", "Zoë", "Ünal", None, "ACME", None, None, None, None, None),
        ContactRow(5, "ok@x.com", None, None, None, None, None, None, None, None, None),
    ]
    assert [(e.row_number, e.message, payload(e)) for e in errors] == [
        (
            3,
            "email: not a valid email address",
            {
                "E-mail": "bad-address",
                "Given name": "Multi\r\nline",
                "Surname": "x",
                "Organisation": "y",
                "Notes": "z",
            },
        )
    ]
