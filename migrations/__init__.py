"""Alembic migrations of the service's database (one revision per schema change)."""
