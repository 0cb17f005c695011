"""Contact and company exports: rows streamed from PostgreSQL's COPY to local disk or S3.

`csv_format` holds the CSV format of CONTRACT §9 and the formula-injection rule (in Python and
as SQL); storage lives in `worker.storage`.
"""
