"""Payments: ``pricing`` (work units → tokens, estimates, deposits), ``chain`` (the one module that talks
to an EVM node: deployment, typed escrow and token calls, signing, receipts, events) and ``ledger`` (each
job's escrow moved one step at a time from the chain's state; every transaction stored signed before it
is broadcast).

May import: ``common``, ``farm.store``, ``farm.kinds``, ``farm.verify`` (tiers, for whose timing sets the rate).
"""
