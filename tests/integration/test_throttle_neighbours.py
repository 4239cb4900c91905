"""The throttle's bucket shared with its neighbours, against a real Redis.

Other clients of the key get the room learnt for them and the floor; other threads
and processes race on the bucket without ever putting a window over the limits; other
instances and a lost log meet at the seed. Times asserted are Redis times
(``Admission.at_ms``); only upper bounds allow for a late wake-up.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

import worker.throttle
from jobs.constants import throttle_pause_key, throttle_total_key
from jobs.models import Priority
from tests.integration.throttle_helpers import (
    BUCKET,
    LATE_MS,
    CountingRedis,
    costs,
    make,
    members,
    redis_now_ms,
    worst_window,
)
from worker.throttle import (
    Admission,
    History,
    Throttle,
    ThrottleInterrupted,
    ThrottleTimeout,
    WindowUsage,
    no_history,
)
from worker.throttle_scripts import Room

pytestmark = pytest.mark.integration

BULK, INTERACTIVE = Priority.BULK, Priority.INTERACTIVE


def learnt(throttle: Throttle) -> tuple[int, int]:
    room = throttle.room()
    return room.requests, room.tokens


def fill(throttle: Throttle) -> list[Admission]:
    """The interactive calls the window takes now."""
    admitted = []
    while True:
        try:
            admitted.append(throttle.acquire(1, max_wait=0, priority=INTERACTIVE))
        except ThrottleTimeout:
            return admitted


def answered(throttle: Throttle) -> Admission:
    """A call of ours, answered and gone: its headers are what the tests observe."""
    admission = throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    throttle.release(admission)
    assert admission.ours == (1, 1)  # the provider counted it and nothing else of ours
    return admission


# --- room for other clients of the key ------------------------------------------------


def test_others_seen_in_the_headers_grow_the_room_and_bulk_leaves_it(r: CountingRedis) -> None:
    # Steps of 1 request and 40 tokens.
    throttle = make(r, rpm=20, tpm=2000, window_s=1.0)
    ours = answered(throttle)
    throttle.observe(ours, 14, 1599)  # the others used 20 - 14 - 1 = 5 and 400
    assert learnt(throttle) == (6, 440)  # a step above what they use
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1561, max_wait=0, priority=INTERACTIVE)
    throttle.release(throttle.acquire(1560, max_wait=0, priority=INTERACTIVE))
    throttle.observe(ours, 14, 1599)
    assert learnt(throttle) == (6, 440)  # as long as they use no more, it stays
    # Bulk now fills 14 of the 20 places, a turn every 1000 / 14 ms: the fifteenth
    # call waits for the first to leave.
    bulk = [throttle.acquire(1) for _ in range(15)]
    for k in range(14):  # spread over the whole window (a turn may come half a turn early)
        assert bulk[k].at_ms >= bulk[0].at_ms + 71 * k - 35
    assert bulk[13].at_ms <= bulk[0].at_ms + 13 * 71 + LATE_MS
    assert bulk[14].at_ms >= bulk[0].at_ms + 1000
    assert worst_window([(a.at_ms, 1) for a in bulk], 1000) == (14, 14)


def test_the_room_follows_the_others_down_and_counts_ours_out(r: CountingRedis) -> None:
    throttle = make(r, rpm=20, tpm=2000, window_s=2.0)
    ours = answered(throttle)
    followed = []
    for remaining in [13, 13, 12, 17, 17, 17, 17, 17]:  # they use 6, then all 7, then 2
        throttle.observe(ours, remaining, None)
        followed.append(learnt(throttle)[0])
    assert followed == [7, 7, 8, 7, 6, 5, 4, 3]
    calls = fill(throttle)
    assert len(calls) == 17
    # The provider's count on the last answer includes our 17 calls: 20 - 1 - 17 = 2
    # are the others', as before.
    assert calls[-1].ours == (17, 17)
    throttle.observe(calls[-1], 1, None)
    assert learnt(throttle) == (3, 0)
    for _ in range(3):  # once they are gone, down to nothing
        throttle.observe(ours, 19, None)
    assert learnt(throttle) == (0, 0)


def test_our_calls_admitted_just_after_are_not_taken_for_others(r: CountingRedis) -> None:
    """A call of ours admitted within the late-start allowance after another may reach
    the provider first, so the headers on the first one's answer may count it: it is
    ours, not another client's. A call admitted later than that is not."""
    throttle = make(r, rpm=20, tpm=2000, window_s=1.0, late_start_ms=200)
    a = throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    b = throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    assert a.ours == (1, 1) and b.at_ms - a.at_ms <= 200
    throttle.observe(a, 18, 1998)  # b arrived first: the provider counted both
    assert learnt(throttle) == (0, 0)
    time.sleep(0.3)
    throttle.acquire(1, max_wait=0, priority=INTERACTIVE)  # past the allowance
    throttle.observe(a, 17, 1997)  # a third call counted at a's arrival: somebody else's
    assert learnt(throttle) == (2, 0)  # its token is less than half a step: noise


def test_a_refused_call_grows_the_room_and_pauses_the_bucket(r: CountingRedis) -> None:
    throttle = make(r, rpm=20, tpm=2000, window_s=1.0)
    refused = throttle.acquire(1, priority=INTERACTIVE)
    throttle.refused(refused, 0.5)
    assert learnt(throttle) == (2, 80)  # two steps: somebody took our place
    until = int(r.get(throttle_pause_key(BUCKET)) or 0)
    assert 0.3 < throttle.paused_for() <= 0.5
    after = throttle.acquire(1)
    assert until <= after.at_ms <= until + LATE_MS
    assert refused.id in members(r)  # it keeps its place: the provider counted it
    for _ in range(5):
        throttle.refused(refused, 0)
    assert learnt(throttle) == (10, 480)  # requests stop at half the limit
    # A 429 with headers grows the room only in the limit they show used up.
    other = Throttle(r, "refused:1", rpm=20, tpm=2000, window_s=1.0, seed=no_history)
    other.refused(answered(other), 0, 0, 1999)
    assert learnt(other) == (2, 0)


def test_the_floor_is_always_left(r: CountingRedis) -> None:
    def bucket(name: str) -> Throttle:  # a quarter of 8 requests and 800 tokens: 2 and 200
        return Throttle(r, name, rpm=8, tpm=800, window_s=1.0, floor=0.25, seed=no_history)

    alone = bucket("floor:alone")
    assert len(fill(alone)) == 6
    assert alone.room() == Room()  # the floor is not learnt, it is always there
    tokens = bucket("floor:tokens")
    with pytest.raises(ThrottleTimeout):
        tokens.acquire(601, max_wait=0, priority=INTERACTIVE)
    tokens.acquire(600, max_wait=0, priority=INTERACTIVE)
    below = bucket("floor:below")
    ours = answered(below)
    below.observe(ours, 6, None)  # the others use 1: a room of 2
    below.observe(ours, 7, None)  # then none: 1, less than the floor
    assert learnt(below) == (1, 0)
    assert len(fill(below)) == 6
    above = bucket("floor:above")
    above.observe(answered(above), 5, None)  # the others use 2: a room of 3, above it
    assert learnt(above) == (3, 0)
    assert len(fill(above)) == 5


def test_without_headers_a_room_grown_by_429s_decays(
    r: CountingRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.throttle, "ROOM_DECAY_MS", 300)
    throttle = make(r, rpm=20, tpm=2000, window_s=1.0)
    ours = throttle.acquire(1, priority=INTERACTIVE)
    throttle.refused(ours, 0)
    assert learnt(throttle) == (2, 80)
    throttle.observe(ours, None, None)
    assert learnt(throttle) == (2, 80)  # too soon
    time.sleep(0.35)
    throttle.observe(ours, None, None)
    assert learnt(throttle) == (1, 40)  # a step
    throttle.observe(ours, None, None)
    assert learnt(throttle) == (1, 40)  # a step per decay time, not per answer
    time.sleep(0.35)
    throttle.observe(ours, None, None)
    assert learnt(throttle) == (0, 0)
    time.sleep(0.35)
    trips = throttle.stats().redis_round_trips
    throttle.observe(ours, None, None)
    assert throttle.stats().redis_round_trips == trips + 1  # a look, nothing to write
    assert learnt(throttle) == (0, 0)


# --- seed -----------------------------------------------------------------------------


@pytest.mark.parametrize("lose", ["flushdb", "init key"])
def test_a_lost_log_is_seeded_before_anything_is_admitted(r: CountingRedis, lose: str) -> None:
    ours: list[Admission] = []
    read: list[int] = []

    def seed() -> list[tuple[float, int]]:  # the ledger: our calls, aged on Redis time
        now = redis_now_ms(r)
        read.append(now)
        return [((now - a.at_ms) / 1000, a.tokens) for a in ours]

    throttle = make(r, rpm=3, tpm=10_000, window_s=1.5, seed=seed)
    ours += [throttle.acquire(5, priority=INTERACTIVE) for _ in range(3)]
    assert len(read) == 1  # the first call found no log
    if lose == "flushdb":
        r.flushdb()
    else:
        r.delete(throttle_total_key(BUCKET))
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(5, max_wait=0, priority=INTERACTIVE)
    assert len(read) == 2
    seeded = {m: s for m, s in members(r).items() if m.startswith("s.")}
    # Logged when they were admitted, give or take the moment between the ledger's
    # read and the script: never earlier, so never out of the window too soon (but for
    # the 1 ms apart that calls admitted in the same ms are stamped, up to 2 ms here).
    for score, admission in zip(sorted(seeded.values()), ours, strict=True):
        assert admission.at_ms - 2 <= score <= admission.at_ms + LATE_MS
    assert [costs(r)[m] for m in seeded] == [5, 5, 5]
    # A flush leaves only the history; a lost marker adds it to what is left (counted
    # twice rather than lost).
    assert throttle.usage().requests == (3 if lose == "flushdb" else 6)
    late = throttle.acquire(5, priority=INTERACTIVE)
    assert ours[0].at_ms + 1500 <= late.at_ms <= ours[-1].at_ms + 1500 + LATE_MS


def test_history_older_than_the_window_is_ignored(r: CountingRedis) -> None:
    history = [(5.0, 10), (1.0, 30), (0.5, 40), (math.inf, 50), (math.nan, 60), (0.2, 20)]
    throttle = make(r, rpm=10, tpm=10_000, window_s=1.0, seed=lambda: history)
    throttle.acquire(1, max_wait=0)
    assert throttle.usage() == WindowUsage(requests=3, tokens=61)
    assert sorted(costs(r).values()) == [1, 20, 40]


def test_concurrent_first_acquirers_seed_once(r: CountingRedis) -> None:
    """Separate instances (as separate processes would) all read the history; one logs it."""
    instances, history = 6, [(0.1, 7)] * 3
    read = 0
    read_lock = threading.Lock()
    everyone_read = threading.Barrier(instances)

    def seed() -> list[tuple[float, int]]:
        nonlocal read
        with read_lock:
            read += 1
        everyone_read.wait(timeout=10)  # all of them found the log lost
        return history

    throttles = [make(r, rpm=100, tpm=10_000, window_s=1.0, seed=seed) for _ in range(instances)]
    with ThreadPoolExecutor(instances) as pool:
        done = list(pool.map(lambda t: t.acquire(1, priority=INTERACTIVE), throttles))
    assert read == instances
    log = members(r)
    assert sum(1 for m in log if m.startswith("s.")) == len(history)
    assert {m for m in log if not m.startswith("s.")} == {a.id for a in done}
    assert throttles[0].usage() == WindowUsage(requests=instances + 3, tokens=instances + 21)
    throttles[0].acquire(1, priority=INTERACTIVE)
    assert read == instances  # once seeded, nobody reads the history again


def test_threads_of_one_instance_read_the_history_once(r: CountingRedis) -> None:
    read = 0

    def seed() -> list[tuple[float, int]]:
        nonlocal read
        read += 1
        time.sleep(0.2)  # a slow ledger query: every thread finds the log lost meanwhile
        return [(0.1, 5)]

    throttle = make(r, rpm=100, tpm=10_000, window_s=1.0, seed=seed)
    together = threading.Barrier(10)

    def call(n: int) -> Admission:
        together.wait(timeout=10)
        return throttle.acquire(1, priority=BULK if n % 2 else INTERACTIVE)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(call, range(10)))
    assert read == 1  # bulk and interactive threads alike
    assert throttle.usage() == WindowUsage(requests=11, tokens=15)


# --- racing threads and processes -----------------------------------------------------

WINDOW_MS, RPM, TPM = 1000, 20, 1000


def cheap(rng: random.Random) -> int:
    """20 calls cost at most 400 tokens: the request limit binds."""
    return rng.randint(1, 20)


def dear(rng: random.Random) -> int:
    """10 calls cost about a window's tokens: the token limit binds."""
    return rng.randint(50, 150)


def bucket_throttle(client: redis.Redis, seed: Callable[[], History] = no_history) -> Throttle:
    return Throttle(
        client,
        BUCKET,
        rpm=RPM,
        tpm=TPM,
        window_s=WINDOW_MS / 1000,
        late_start_ms=50,
        seed=seed,
    )


def hammer(
    throttle: Throttle,
    stop: threading.Event,
    n: int,
    price: Callable[[random.Random], int],
    out: list[tuple[int, int, int]],
    interactive: bool,
) -> None:
    """Call until stopped (interactive calls with a pause between them): some calls
    start late, some are never sent, the rest are charged their reservation or less.
    Records ``(at, tokens, bulk)`` of every call sent."""
    rng = random.Random(n)
    priority = INTERACTIVE if interactive else BULK
    while not stop.is_set():
        if priority is INTERACTIVE:
            stop.wait(rng.uniform(0.1, 0.4))
        cost = price(rng)
        try:
            admission = throttle.acquire(cost, max_wait=60, stop=stop, priority=priority)
        except ThrottleInterrupted:
            return
        roll = rng.random()
        if roll < 0.1:
            throttle.release(admission)
            continue
        if roll < 0.3:
            time.sleep(rng.uniform(0.06, 0.2))
            admission = throttle.starting(admission)
        charged = rng.randint(cost // 2, cost) if rng.random() < 0.5 else cost
        throttle.settle(admission, charged)
        out.append((admission.at_ms, charged, int(priority is BULK)))


def assert_within_limits(records: list[tuple[int, int, int]], seconds: float, binds: str) -> None:
    """No window over the limits, all while the ``binds`` limit was reached: a window
    within a call of it. (Bulk alone never goes beyond its turns; interactive calls
    take theirs without waiting, so only they bring the window up to its limit.)"""
    worst = worst_window(records, WINDOW_MS)
    bulk = sum(1 for record in records if record[2])
    print(f"\n{len(records)} calls ({bulk} bulk) in {seconds} s; worst window {worst}")
    assert worst[0] <= RPM and worst[1] <= TPM
    # Measured: 20 requests with cheap calls, 930 to 1000 tokens with dear ones.
    assert worst[0] >= RPM - 1 if binds == "requests" else worst[1] >= TPM - 150
    assert len(records) >= 10 * (seconds - 1)


@pytest.mark.parametrize("price", [cheap, dear], ids=["requests bind", "tokens bind"])
def test_threads_never_put_a_window_over_the_limits(
    r: CountingRedis, price: Callable[[random.Random], int]
) -> None:
    throttle = bucket_throttle(r)
    stop = threading.Event()
    records: list[tuple[int, int, int]] = []
    with ThreadPoolExecutor(24) as pool:
        futures = [
            pool.submit(hammer, throttle, stop, n, price, records, n % 4 == 0) for n in range(24)
        ]
        time.sleep(3.0)
        stop.set()
        for future in futures:
            future.result(timeout=30)
    assert_within_limits(records, 3.0, "requests" if price is cheap else "tokens")


def process_worker(redis_url: str, first: int, barrier: Any, results: Any, seconds: float) -> None:
    """One OS process with six threads on the shared bucket, two of them interactive;
    ships its records back."""
    client = redis.Redis.from_url(redis_url)
    throttle = bucket_throttle(client)
    stop = threading.Event()
    records: list[tuple[int, int, int]] = []
    barrier.wait()
    threads = [
        threading.Thread(
            target=hammer, args=(throttle, stop, first + n, cheap, records, n % 3 == 0)
        )
        for n in range(6)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    client.close()
    results.put(records)


def test_processes_never_put_a_window_over_the_limits(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=process_worker, args=(redis_url, 10 * n, barrier, results, 3.0))
        for n in range(3)
    ]
    for process in processes:
        process.start()
    records: list[tuple[int, int, int]] = []
    try:
        barrier.wait(timeout=60)
        for _ in processes:
            records.extend(results.get(timeout=60))
    finally:
        barrier.abort()  # frees children still at the barrier if the parent gave up
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join()
    assert all(process.exitcode == 0 for process in processes)
    assert_within_limits(records, 3.0, "requests")


def test_a_log_flushed_under_load_is_seeded_and_never_overfills(r: CountingRedis) -> None:
    records: list[tuple[int, int, int]] = []
    lock = threading.Lock()
    read = 0

    def seed() -> list[tuple[float, int]]:  # the ledger: what the threads recorded
        nonlocal read
        time.sleep(0.05)  # calls admitted just before the flush are recorded by then
        now = redis_now_ms(r)
        with lock:
            read += 1
            return [((now - at) / 1000, t) for at, t, _ in records if now - at < WINDOW_MS]

    throttle = bucket_throttle(r, seed)
    stop = threading.Event()

    def run(n: int) -> None:
        rng = random.Random(n)
        priority = INTERACTIVE if n % 4 == 0 else BULK
        while not stop.is_set():
            if priority is INTERACTIVE:
                stop.wait(rng.uniform(0.1, 0.4))
            try:
                admission = throttle.acquire(dear(rng), max_wait=30, stop=stop, priority=priority)
            except ThrottleInterrupted:
                return
            with lock:
                records.append((admission.at_ms, admission.tokens, int(priority is BULK)))

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(run, n) for n in range(12)]
        time.sleep(1.3)
        r.flushdb()  # Redis lost everything; the provider did not
        flushed_at = redis_now_ms(r)
        time.sleep(2.7)
        stop.set()
        for future in futures:
            future.result(timeout=30)
    assert read >= 2  # at the start, and again after the flush
    # It kept admitting: at least a window's worth of these calls (1000 / 100 tokens).
    assert sum(1 for at, _, _ in records if at >= flushed_at) >= 10
    assert_within_limits(records, 4.0, "tokens")
