"""The worker plane's transport: ``broker`` (the ROUTER socket and its event loop, handing batches to
``Coordinator.step`` on the coordinator's thread) and ``gate`` (CurveZMQ admission: open, token,
allowlist; the ZAP handler; revocation).

May import: ``common``, ``farm.core``, ``farm.store``, ``farm.constants``.
"""
