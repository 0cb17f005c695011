FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY jobs ./jobs
COPY db ./db
RUN pip install .
USER nobody
CMD ["python", "-m", "worker", "run"]
