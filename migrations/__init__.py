"""Alembic migrations; configured from ``[tool.alembic]`` in pyproject.toml."""
