"""Database layer: SQLAlchemy 2.0 models, async sessions, Alembic migrations."""
