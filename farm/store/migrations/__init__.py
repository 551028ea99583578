"""Alembic migration scripts (env.py, versions/); run them through :mod:`farm.store.migrate`."""
