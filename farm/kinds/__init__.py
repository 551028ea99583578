"""Job kinds: how a creator's request becomes tasks. ``frames`` (frame specs, chunks, render settings),
``tiles`` (tile grids, assembly and video encode tasks), ``diffusion`` (prompt batches, img2img chains),
``jobs`` (what every kind shares: storing a plan, views, cancel) and ``registry`` (kind → planner, and
the kinds' reactions to other jobs' status changes, which the core calls).

May import: ``common``, ``farm.store``, ``farm.constants``. Never the core, verification or the web.
"""
