"""The coordinator's core: worker messages in, leases and results persisted, replies out.

``coordinator`` (``Coordinator.step``, I/O-free: tests drive it directly), ``assignment`` (which queued
task goes to which free worker), ``scheduler`` (the weighted choice), ``leases`` (the in-memory copies of
live leases and of the head of the queue, fenced by the database).

May import: ``common``, ``farm.store``, ``farm.kinds``, ``farm.verify``, ``farm.constants``.
"""
