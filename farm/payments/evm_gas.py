"""Gas estimates for the in-process EVM (eth-tester on py-evm) in one execution instead of a search.

py-evm's default estimator (``binary_gas_search_intrinsic_tolerance``) runs the transaction ~13 times,
bisecting between the intrinsic gas and the block's limit. On the embedded chain each run is the
interpreter executing the contract in Python: an ``open_job`` deposit spent ~60 % of its signing time
there (cProfile: 125 of 297 ms, ~40 ms unprofiled), on the path from submit to the first lease.

:func:`one_run` executes once at the block's gas limit and returns what that run needed *before* refunds
(``intrinsic + computation.get_gas_used()``, summed over the whole call tree since a child's use is
charged to its parent), grown by 64/63 per level of call depth (EIP-150: a CALL hands its callee at most
63/64 of what is left, so a callee that used g needs g·64/63 left at its caller). That is an upper bound
of the least gas that succeeds for contracts whose path does not depend on ``gasleft()`` (ours do not);
:meth:`farm.payments.chain.Chain.sign` adds its own 25 % + 20,000 on top, as it does for any node.

A transaction that fails at the block's limit raises the run's error, exactly as the binary search does
(its first step is the same run), so a revert is still refused at signing time with the contract's
reason. Nodes (anvil, geth) estimate themselves and never see this.
"""
from __future__ import annotations

from typing import Any

CALL_DEPTH_MARGIN = 64 / 63


def _depth(computation: Any) -> int:
    """Levels of calls under ``computation`` (0 when it called nothing)."""
    return max((1 + _depth(c) for c in computation.children), default=0)


def one_run(state: Any, transaction: Any) -> int:
    """py-evm gas estimator (``Chain.gas_estimator``): the gas ``transaction`` needs, from one run."""
    from eth.vm.spoof import SpoofTransaction  # py-evm: only the embedded chain imports it
    run = SpoofTransaction(transaction, gas=state.gas_limit, gas_price=0)
    snapshot = state.snapshot()
    try:
        computation = state.apply_transaction(run)
        if computation.is_error:
            raise computation.error
        used = transaction.intrinsic_gas + computation.get_gas_used()
        return min(state.gas_limit, int(used * CALL_DEPTH_MARGIN ** _depth(computation)) + 1)
    finally:
        state.revert(snapshot)


def install(backend: Any) -> None:
    """Make eth-tester's py-evm ``backend`` estimate with :func:`one_run`, also on the chain objects it
    makes later (it rebuilds its chain when reverting to the genesis snapshot)."""
    chain = backend.chain
    type(chain).gas_estimator = staticmethod(one_run)
    chain.gas_estimator = one_run
