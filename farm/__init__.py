"""The coordinator: one process that every creator (HTTP) and worker (ZeroMQ) talks to.

Where things happen, in the order a frame lives through them:

* ``farm.kinds``: a job is planned into tasks (frames, chunks, tiles, video, diffusion images, chains);
* ``farm.core``: tasks are leased to workers, fenced by (task, attempt), and their results stored
  (``Coordinator.step``: a batch of messages, one transaction, then the replies);
* ``farm.verify``: results are inspected and spot-checked; reputation is kept;
* ``farm.payments``: work is priced and paid out through the on-chain escrow;
* ``farm.web``: creators submit, follow, review previews and approve (API and pages);
* ``farm.plane``: the ZeroMQ socket and its CurveZMQ gate, in front of the core;
* ``farm.store``: tables, the one state machine, migrations, the blob store.

``farm.server`` builds them into one process (``farm serve``); ``farm.constants`` holds the coordinator's
policy numbers. Imports point one way: web → {core, kinds, verify, payments} → store → ``common``; core →
verify (which reaches back only through its port, ``farm.verify.port``) and kinds; plane → core. Nothing
in ``farm`` imports ``worker`` or ``client``.
"""
