"""What the coordinator and the worker both need, and nothing else: the wire protocol (:mod:`common.protocol`)
and the limits both sides agree on (:mod:`common.limits`), rasters (:mod:`common.rasters`), tile geometry
(:mod:`common.tiles`), CURVE key files (:mod:`common.keys`), content addresses (:mod:`common.hashing`),
model-folder checks (:mod:`common.model_folders`) and structured logs (:mod:`common.logs`).

May import: the standard library and third-party packages. Never ``farm``, ``worker`` or ``client``.
"""
