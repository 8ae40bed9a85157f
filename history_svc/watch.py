"""Opening a WatchPayments stream: subscribed first, then the account checked and the missed changes read back."""

from __future__ import annotations

from dataclasses import dataclass

from history_svc.changestream import Change, ChangeStream
from history_svc.queries import Reads
from history_svc.resume import ChangePosition
from history_svc.watcher import ChangeWatcher, Subscription
from payments_common.errors import NotFound


@dataclass(frozen=True)
class OpenWatch:
    """One open stream: the changes missed since the client's position, a list per batch, then the live ones.

    The backlog ends exactly where the subscription begins, so together they deliver every
    change once. `close` must be called when the stream ends, however it ends.
    """

    backlog: list[list[Change]]
    subscription: Subscription
    watcher: ChangeWatcher

    def close(self) -> None:
        self.watcher.unsubscribe(self.subscription)


class Watches:
    """Opens WatchPayments streams on the process's one change watcher."""

    def __init__(
        self, watcher: ChangeWatcher, read_model: Reads, stream: ChangeStream, queue_size: int
    ) -> None:
        self._watcher = watcher
        self._read_model = read_model
        self._stream = stream
        self._queue_size = queue_size

    async def open(self, account_id: str, after: int | ChangePosition | None) -> OpenWatch:
        """Subscribes, checks that the account exists, and reads back what it missed after `after`.

        Subscribed before the existence check and the backlog, so that no change falls
        between them: the backlog ends at the entry where the subscription begins.
        """
        subscription = self._watcher.subscribe(account_id, self._queue_size)
        try:
            if not await self._read_model.account_exists(account_id):
                raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": account_id})
            backlog: list[list[Change]] = []
            if after is not None:
                backlog = await self._stream.missed_changes(
                    account_id, after, subscription.after_id, subscription.after_lsn
                )
                await self._fill_timelines([change for group in backlog for change in group])
        except BaseException:
            self._watcher.unsubscribe(subscription)
            raise
        return OpenWatch(backlog, subscription, self._watcher)

    async def _fill_timelines(self, changes: list[Change]) -> None:
        """Adds their timelines to the views read back from the stream that carry none."""
        missing = [change.view.payment_id for change in changes if not change.view.timeline]
        if not missing:
            return
        found = await self._read_model.timelines(missing)
        for change in changes:
            if not change.view.timeline and change.view.payment_id in found:
                change.view.timeline.extend(found[change.view.payment_id])
