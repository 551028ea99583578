"""The GPU host's side: ``daemon`` (``farm worker``: one DEALER socket, heartbeats, leases, blob transfer),
``blobcache`` (the local content-addressed cache), ``keys`` (the worker's CURVE identity), ``benchmark``
(its speed in work units), ``settings`` (its tunables), ``runtimes/`` (the long-lived Blender and
diffusion child processes) and ``tasks/`` (what each task kind does with them).

May import: ``common`` only, never ``farm``. The daemon never imports bpy or torch: only runtime children do.
"""
