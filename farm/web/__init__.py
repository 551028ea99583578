"""The creator plane: the HTTP JSON API (``app`` and its routers ``api_blobs``, ``api_jobs``,
``api_workers``, ``payments``), the approval pages (``pages``, ``review``, watermarked ``previews``),
sign-in (``auth``) and Prometheus ``metrics``.

May import: ``common`` and ``farm``'s planes below it (kinds, verify, payments, store); the broker is
handed in, never imported.
"""
