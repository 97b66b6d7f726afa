"""Alembic migrations for the source schema (run with ``modcache db upgrade``)."""
