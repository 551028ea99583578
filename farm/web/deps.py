"""What every API router shares: the database session, the signed-in user, and the coordinator's thread.

:class:`Api` is made once by :func:`farm.web.app.create_app` and handed to each router factory; its
``SessionDep`` and ``UserDep`` are FastAPI ``Annotated`` dependencies. Every route but ``/api/health``
needs ``Authorization: Bearer <token>``.
"""
import asyncio
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException
from sqlmodel import Session

from farm.payments.market import Market
from farm.payments.pricing import Pricing
from farm.payments.quotes import TierTerms
from farm.store.blobs import BlobStore
from farm.store.db import session as new_session
from farm.store.models import User
from farm.web import auth


class Api:
    """The state the routers close over: engine, blob store, broker (None in tests without one), ledger, and
    the market (the price now) with the tiers' multipliers."""

    def __init__(self, engine, blobs: BlobStore, broker=None, info: dict[str, Any] | None = None, ledger=None,
                 market: Market | None = None):
        self.engine, self.blobs, self.broker, self.info, self.ledger = engine, blobs, broker, info or {}, ledger
        self.pricing = ledger.pricing if ledger is not None else Pricing.from_env()
        self.market = market or Market.for_farm(engine, self.pricing)  # the price by load (farm.payments.market)
        self.tiers = TierTerms.from_env()

        def get_session():
            with new_session(engine) as s:
                yield s

        self.get_session = get_session
        self.SessionDep = Annotated[Session, Depends(get_session)]

        def get_user(s: self.SessionDep, authorization: Annotated[str | None, Header()] = None) -> User:
            user = auth.user_for_token(s, auth.bearer_token(authorization))
            if user is None:
                raise HTTPException(401, "missing or unknown API token: pass 'Authorization: Bearer <token>' "
                                         "(farm --token, or RENDERHIVE_TOKEN)")
            return user

        self.get_user = get_user
        self.UserDep = Annotated[User, Depends(get_user)]

    def hold_for_deposit(self, user: User) -> bool:
        """Whether ``user``'s new jobs wait for their deposit before any task is leased: always when the farm
        takes payments, unless the operator gave this creator a credit line (``farm user NAME --credit-line``)."""
        return self.ledger is not None and not user.credit_line

    def wake_ledger(self) -> None:
        """Ask the settler for a pass soon (a new job's deposit, an approval)."""
        hook = getattr(self.ledger, "wake_hook", None)
        if hook is not None:
            hook()

    async def serial(self, fn, *args):
        """Run on the coordinator thread when a broker is attached (tests may run without one)."""
        if self.broker is not None:
            return await self.broker.call(fn, *args)
        return await asyncio.to_thread(fn, *args)
