"""Durable state: the tables (``models``, ``ledger_models``), the engine and sessions (``db``), the step's
write-behind buffer (``writes``), the one state machine every status change goes through (``states``),
Alembic migrations (``migrate``, ``migrations/``) and the content-addressed blob store (``blobs``).

May import: ``common`` only.
"""
