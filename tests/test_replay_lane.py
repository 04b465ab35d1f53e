"""The replay lane (gateway/lanes.py): replayed and judge calls share `server.replay_concurrency` slots; production
calls never wait behind them. The lane wraps whatever ASGI app it is given; here an app that holds each call until
released, so the test controls exactly how many calls are in flight."""
from __future__ import annotations

import asyncio

from gateway.lanes import ReplayLane, is_replay_call


def scope(source: str | None) -> dict:
    headers = [(b"authorization", b"Bearer x")] + ([(b"x-tagway-source", source.encode())] if source else [])
    return {"type": "http", "path": "/v1/chat/completions", "headers": headers}


def test_which_calls_are_replay_calls():
    assert is_replay_call(scope("replay")) and is_replay_call(scope("replay-judge"))
    assert not is_replay_call(scope(None)) and not is_replay_call(scope("prod"))


async def test_the_lane_admits_at_most_its_limit_and_production_passes():
    lane = ReplayLane(2)
    release = asyncio.Event()
    in_flight, peak = 0, 0

    async def held(scope, receive, send):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1

    replays = [asyncio.create_task(lane(held, scope("replay"), None, None)) for _ in range(6)]
    await asyncio.sleep(0.05)
    assert in_flight == 2  # four replay calls wait for a slot
    production = asyncio.create_task(held(scope(None), None, None))  # the app calls the proxy directly for these
    await asyncio.sleep(0.01)
    assert in_flight == 3
    release.set()
    await asyncio.gather(*replays, production)
    assert peak == 3 and in_flight == 0
