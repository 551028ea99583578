"""Runtime children: ``process`` (the parent's handle of a long-lived child speaking JSON lines), ``blender``
(bpy, the scene kept loaded between tasks), ``diffusion`` (diffusers pipelines cached by model hash) and
``tiny_pipeline`` (the random-weight pipeline that tests and the demo build locally).

May import: ``common`` and ``worker.settings``.
"""
