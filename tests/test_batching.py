"""Unit behaviour of the batcher and the ack tracker (no broker needed: they only order work)."""

from __future__ import annotations

import asyncio

from inferq.broker.acks import AckTracker
from inferq.actors.batcher import Batcher


class FakeChannel:
    pass


class Delivery:
    """Records how it was acked; stands in for an incoming message's ack API only."""

    def __init__(self, tag: int, channel: object) -> None:
        self.tag, self.channel, self.message_id = tag, channel, str(tag)
        self.acks: list[bool] = []

    async def ack(self, multiple: bool = False) -> None:
        self.acks.append(multiple)


async def test_an_idle_batcher_dispatches_at_once_and_a_busy_one_fills_the_batch() -> None:
    mailbox: asyncio.Queue = asyncio.Queue()
    batcher = Batcher(mailbox, max_size=4, max_delay_s=0.05)
    mailbox.put_nowait(1)
    assert await batcher.next_batch(wait=False) == [1]
    for i in range(6):
        mailbox.put_nowait(i)
    assert await batcher.next_batch() == [0, 1, 2, 3]
    assert await batcher.next_batch() == [4, 5]


async def test_a_drain_hands_back_a_batch_cut_off_while_collecting() -> None:
    mailbox: asyncio.Queue = asyncio.Queue()
    batcher = Batcher(mailbox, max_size=4, max_delay_s=5)
    mailbox.put_nowait("a")
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.01)
    task.cancel()
    mailbox.put_nowait("b")
    assert batcher.take_all() == ["a", "b"]


async def test_acks_cover_finished_runs_only_and_never_cross_a_channel_change() -> None:
    tracker, old, new = AckTracker(), FakeChannel(), FakeChannel()
    d = [Delivery(1, old), Delivery(2, old), Delivery(3, old), Delivery(1, new), Delivery(2, new)]
    for delivery in d:
        tracker.track(delivery)
    await tracker.finish(acked=[d[1], d[2]])
    assert all(not x.acks for x in d), "delivery 1 is still running: a multiple ack would settle it"
    await tracker.finish(acked=[d[0], d[3]], settled=[d[4]])
    assert d[2].acks == [True] and d[3].acks == [True]
    assert not d[0].acks and not d[1].acks and not d[4].acks
    assert len(tracker) == 0


async def test_the_mailbox_hands_out_every_high_priority_item_before_any_normal_one() -> None:
    from inferq.actors.mailbox import Mailbox

    mailbox: Mailbox[str] = Mailbox()
    for item in ("n1", "n2"):
        mailbox.put_nowait(item)
    mailbox.put_nowait("h1", high=True)
    batcher = Batcher(mailbox, max_size=2, max_delay_s=0.01)
    assert await batcher.next_batch() == ["h1", "n1"]
    mailbox.put_nowait("h2", high=True)
    assert await batcher.next_batch() == ["h2", "n2"] and mailbox.empty()
