"""Verification and reputation: cheap checks on every result, spot checks re-rendered by another worker
(``verifier``), the comparison of pictures (``compare``), and each worker's Beta reputation, tier and
measured speed (``reputation``).

May import: ``common``, ``farm.store``, ``farm.constants``. The coordinator's core is reached only through
the port declared in ``port`` (accept, record evidence, revoke, request an assignment round).
"""
