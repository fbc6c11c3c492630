"""The actor's stop: every owned task ends, even one that lost a cancel (in process, no services)."""

from __future__ import annotations

import asyncio

from inferq.runtime.actor import Actor


class _Sleeper(Actor):
    """Spawns one loop that, like a refresh loop around ``asyncio.wait_for`` on 3.11, loses its first cancel."""

    def __init__(self) -> None:
        super().__init__("sleeper")
        self.cancels_seen = 0
        self.running = asyncio.Event()

    async def on_start(self) -> None:
        self.spawn(self._loop(), "refresh")

    async def _loop(self) -> None:
        while True:
            self.running.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancels_seen += 1
                if self.cancels_seen > 1:
                    raise
                # The first cancel is dropped, as wait_for drops one that races the inner result.


async def test_a_task_that_lost_its_cancel_is_cancelled_again_and_the_stop_finishes() -> None:
    actor = _Sleeper()
    await actor.start()
    await actor.running.wait()
    await asyncio.wait_for(actor.stop(), 5)
    assert actor.state == "stopped" and actor.cancels_seen == 2



class _Hanging:
    """A resource whose close never returns, like a channel close the broker never answers."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    async def aclose(self) -> None:
        self.closing.set()
        await asyncio.Event().wait()


async def test_a_close_that_hangs_is_given_up_within_the_budget_and_the_rest_still_close(monkeypatch) -> None:
    monkeypatch.setattr("inferq.runtime.actor.CLOSE_BUDGET_S", 0.5)
    actor, closed = Actor("hanging"), []

    async def first() -> None:  # registered first, so closed last: after the hanging one
        closed.append("first")

    actor.on_stop(first)
    hanging = await actor.own(_opened(_Hanging()))
    await actor.start()
    await asyncio.wait_for(actor.stop(), 5)
    assert hanging.closing.is_set() and closed == ["first"] and actor.state == "stopped"


async def _opened(resource):
    return resource
