"""Contact and company exports: rows streamed from PostgreSQL's COPY to local disk or S3.

`csv_format` holds the CSV format of CONTRACT §9 and the formula-injection rule (in Python and
as SQL); `query` the SELECTs the COPY runs; `job` the two arq jobs and how they stay correct
when delivered twice; storage lives in `worker.storage`.
"""

from jobs.exports.job import generate_company_export, generate_contact_export

JOBS = [generate_contact_export, generate_company_export]

__all__ = ["JOBS", "generate_company_export", "generate_contact_export"]
