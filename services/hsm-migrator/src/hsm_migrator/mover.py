"""One move, step by step: copy → verify → switch the index → delete the source.

Each step starts from what the ``hsm_move`` row says, so a move resumed
after a crash (by this or any replica) redoes at most the step that was
interrupted, and every step is safe to redo:

* **copy** — the destination is write-once.  An object already at the
  destination key with the same content (an earlier attempt that crashed
  after writing) is adopted; a *different* object there is never touched:
  the copy goes to a key of its own (the key with the content's digest).
* **verify** — the destination is read back and hashed.  Archive tiers
  (S3 GLACIER/DEEP_ARCHIVE, Azure Archive) cannot be read without a
  restore: there the size and the sha256 the destination recorded when it
  received the bytes are compared instead.
* **switch** — in one transaction, and only if the index still points at
  the source: the location becomes the destination, the instance's
  availability follows the destination (NEARLINE in an archive), the move
  becomes ``switched``.  If the index moved on meanwhile (the instance was
  deleted or replaced), the move is abandoned and its copy removed.
* **delete** — the source object goes, unless something still names it.

The index never points at an object that was not verified, and the source
is deleted only once the index points elsewhere: killed anywhere, the
system holds one referenced, valid copy (and at worst an unreferenced one
that the rerun removes).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from collections.abc import Awaitable, Callable
from enum import StrEnum

import asyncpg

from hsm_migrator.moves import Move, MoveState, MoveStore
from pacs_common.hsm.availability import set_availability
from pacs_common.locks import is_locked_by_other
from pacs_common.storage import (
    ObjectArchivedError,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StorageRegistry,
    copy_object,
    sha256_of,
)

__all__ = ["FaultHook", "MoveError", "MoveOutcome", "MoveStep", "Mover"]

logger = logging.getLogger(__name__)


class MoveStep(StrEnum):
    """Points between the steps (where a test may inject a crash)."""

    AFTER_COPY = "after-copy"
    AFTER_VERIFY = "after-verify"
    AFTER_SWITCH = "after-switch"
    BEFORE_DELETE = "before-delete"
    AFTER_DELETE = "after-delete"


class MoveOutcome(StrEnum):
    DONE = "done"
    ABANDONED = "abandoned"
    # The study is locked by somebody else: tried again later.
    POSTPONED = "postponed"


class MoveError(Exception):
    """A move failed; ``reason`` is the metric label, ``permanent`` means
    trying again will not help."""

    def __init__(self, reason: str, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


#: Called at each :class:`MoveStep`; raising there interrupts the move (tests).
FaultHook = Callable[[MoveStep, Move], Awaitable[None]]


def digest_key(key: str, sha256: str) -> str:
    """``a/b/c.dcm`` → ``a/b/c.<digest>.dcm``: a key of the content's own."""
    head, name = posixpath.split(key)
    stem, dot, extension = name.rpartition(".")
    if not dot:
        stem, extension = name, ""
    named = f"{stem}.{sha256[:16]}" + (f".{extension}" if extension else "")
    return posixpath.join(head, named) if head else named


class Mover:
    """Carries moves to their end (one :class:`Mover` per migrator)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        storage: StorageRegistry,
        store: MoveStore,
        *,
        lock_holder: str,
        postpone_seconds: float,
        fault: FaultHook | None = None,
    ) -> None:
        self._pool = pool
        self._storage = storage
        self._store = store
        self._holder = lock_holder
        self._postpone = postpone_seconds
        self._fault = fault

    async def _at(self, step: MoveStep, move: Move) -> None:
        if self._fault is not None:
            await self._fault(step, move)

    async def run(self, move: Move) -> MoveOutcome:
        """Advance ``move`` from its recorded state to its end."""
        while True:
            if move.state is MoveState.PENDING:
                move = await self._copy(move)
                await self._at(MoveStep.AFTER_COPY, move)
            elif move.state is MoveState.COPIED:
                move = await self._verify(move)
                await self._at(MoveStep.AFTER_VERIFY, move)
            elif move.state is MoveState.VERIFIED:
                switched = await self._switch(move)
                if isinstance(switched, MoveOutcome):
                    return switched
                move = switched
                await self._at(MoveStep.AFTER_SWITCH, move)
            elif move.state is MoveState.SWITCHED:
                await self._at(MoveStep.BEFORE_DELETE, move)
                move = await self._delete_source(move)
                await self._at(MoveStep.AFTER_DELETE, move)
            elif move.state is MoveState.DONE:
                return MoveOutcome.DONE
            else:
                return MoveOutcome.ABANDONED

    # -- copy ------------------------------------------------------------------

    async def _copy(self, move: Move) -> Move:
        source = self._storage.get(move.source_tier)
        target = self._storage.get(move.target_tier)
        key = move.target_key
        for candidate in dict.fromkeys((key, digest_key(move.source_key, move.sha256))):
            if candidate != move.target_key:
                # Record the new key first: a crash after the put must find the object.
                move = await self._store.advance(move, MoveState.PENDING, target_key=candidate)
            written = await asyncio.to_thread(self._copy_to, source, target, move, candidate)
            if written:
                return await self._store.advance(move, MoveState.COPIED, target_written=True)
            logger.info(
                "destination key holds another object; using a key of the content's own",
                extra={"move": move.pk, "tier": move.target_tier, "key": candidate},
            )
        raise MoveError("target-taken", f"move {move.pk}: every destination key holds another object")

    def _copy_to(self, source: ObjectStorage, target: ObjectStorage, move: Move, key: str) -> bool:
        """Copy (or adopt an identical object at ``key``); False when ``key``
        holds a different object."""
        existing = target.stat(key)
        if existing is not None:
            return _same_content(target, existing, move)
        try:
            stored = copy_object(source, move.source_key, target, key)
        except ObjectExistsError:  # somebody wrote it between the stat and the put
            existing = target.stat(key)
            return existing is not None and _same_content(target, existing, move)
        except ObjectArchivedError as exc:
            raise MoveError(
                "source-archived", f"the source is archived; restore it first: {exc}", permanent=True
            ) from exc
        except ObjectNotFoundError as exc:
            raise MoveError("source-missing", f"the source object is missing: {exc}") from exc
        if stored.sha256 != move.sha256 or stored.size != move.size:
            # The source is not what the index says it is: keep the index
            # pointing at it (for an integrity check) and drop the copy.
            target.delete(key)
            raise MoveError(
                "source-checksum",
                f"source {move.source_tier}:{move.source_key} has sha256 {stored.sha256} "
                f"({stored.size} bytes), the index says {move.sha256} ({move.size} bytes)",
                permanent=True,
            )
        return True

    # -- verify ----------------------------------------------------------------

    async def _verify(self, move: Move) -> Move:
        target = self._storage.get(move.target_tier)
        ok, detail = await asyncio.to_thread(_verify_at_destination, target, move)
        if ok:
            return await self._store.advance(move, MoveState.VERIFIED)
        # A bad copy: remove it and copy again (the attempt counts as failed).
        await self.remove_copy(move)
        await self._store.advance(move, MoveState.PENDING, error=detail)
        raise MoveError("verify-mismatch", f"move {move.pk}: {detail}")

    # -- switch ----------------------------------------------------------------

    async def _switch(self, move: Move) -> Move | MoveOutcome:
        async with self._pool.acquire() as connection, connection.transaction():
            # The study's advisory lock first (as delete does), then the rows.
            if await is_locked_by_other(connection, move.study_instance_uid, self._holder):
                locked = True
            else:
                locked = False
                switched = await self._store.advance(move, MoveState.SWITCHED, connection=connection)
                alive = await connection.fetchval(
                    "SELECT pk FROM instance WHERE pk = $1 FOR UPDATE", move.instance_fk
                )
                result = "UPDATE 0"
                if alive is not None:
                    result = await connection.execute(
                        """
                        UPDATE instance_location
                        SET tier = $5, backend = $6, key = $7, stored_at = now()
                        WHERE instance_fk = $1 AND tier = $2 AND key = $3 AND sha256 = $4
                        """,
                        move.instance_fk,
                        move.source_tier,
                        move.source_key,
                        move.sha256,
                        move.target_tier,
                        move.target_backend,
                        move.target_key,
                    )
                if result != "UPDATE 0":
                    await set_availability(connection, [move.instance_fk], move.target_availability)
                else:
                    # The index moved on: the copy is nobody's.
                    switched = await self._store.advance(
                        switched,
                        MoveState.ABANDONED,
                        connection=connection,
                        error="the index no longer points at the source",
                    )
        if locked:
            logger.info("study locked by another holder; move postponed", extra={"move": move.pk})
            await self._store.postpone(move, seconds=self._postpone)
            return MoveOutcome.POSTPONED
        if switched.state is MoveState.ABANDONED:
            await self.remove_copy(switched)
            return MoveOutcome.ABANDONED
        return switched

    # -- delete ----------------------------------------------------------------

    async def _delete_source(self, move: Move) -> Move:
        if not await self._store.is_referenced(move, move.source_tier, move.source_key):
            source = self._storage.get(move.source_tier)
            await asyncio.to_thread(source.delete, move.source_key)
        return await self._store.advance(move, MoveState.DONE)

    # -- clean-up --------------------------------------------------------------

    async def remove_copy(self, move: Move) -> None:
        """Delete the destination object if it is this move's copy and the
        index does not name it."""
        if await self._store.is_referenced(move, move.target_tier, move.target_key):
            return
        target = self._storage.get(move.target_tier)

        def remove() -> None:
            info = target.stat(move.target_key)
            if info is None:
                return
            if move.target_written or (info.sha256 == move.sha256 and info.size == move.size):
                target.delete(move.target_key)

        try:
            await asyncio.to_thread(remove)
        except StorageError as exc:  # an orphan copy is harmless; the index never names it
            logger.warning("could not remove the copy of move %s: %s", move.pk, exc)


def _same_content(storage: ObjectStorage, info: ObjectInfo, move: Move) -> bool:
    if info.size != move.size:
        return False
    if info.sha256 is not None:
        return info.sha256 == move.sha256
    try:
        return sha256_of(storage, info.key) == move.sha256
    except ObjectArchivedError:
        return False  # cannot tell: do not adopt it


def _verify_at_destination(target: ObjectStorage, move: Move) -> tuple[bool, str]:
    """(matches, what was found) for the object at the move's destination."""
    info = target.stat(move.target_key)
    if info is None:
        return False, f"{move.target_tier}:{move.target_key} is missing after the copy"
    if info.size != move.size:
        return False, f"{move.target_tier}:{move.target_key} has {info.size} bytes, expected {move.size}"
    try:
        digest: str | None = sha256_of(target, move.target_key)
        how = "read back"
    except ObjectArchivedError:
        digest = info.sha256  # recorded by the destination from the bytes it received
        how = "recorded by the archive tier"
    if digest != move.sha256:
        return (
            False,
            f"{move.target_tier}:{move.target_key} sha256 ({how}) is {digest}, expected {move.sha256}",
        )
    return True, how
