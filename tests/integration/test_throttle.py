"""The global throttle against a real Redis: Lua decisions, waiting, pauses, concurrency."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import redis

from jobs.constants import throttle_init_key, throttle_log_key, throttle_pause_key
from tests.integration.throttle_helpers import (
    BUCKET,
    Admitted,
    CountingRedis,
    admitted,
    command_calls,
    counting_client,
    log_size,
    make,
    members,
    redis_now_ms,
    released_early,
    wait_until,
    worst_window,
)
from worker.throttle import (
    RequestTooLarge,
    Reservation,
    Throttle,
    ThrottleInterrupted,
    ThrottleStats,
    ThrottleTimeout,
    WindowUsage,
    no_history,
)
from worker.throttle_reference import earliest_slot
from worker.throttle_store import InitMode, ThrottleStore

pytestmark = pytest.mark.integration


# --- decisions ------------------------------------------------------------------------


def test_first_limit_at_once_then_one_window_later(r: CountingRedis) -> None:
    throttle = make(r, rpm=5, tpm=10_000, window_s=1.0)
    first = [throttle.acquire(10, max_wait=0) for _ in range(5)]
    assert throttle.usage() == WindowUsage(requests=5, tokens=50)
    sixth = throttle.acquire(10)
    # The sixth may only start when the first leaves the window (t - W, t].
    assert sixth.start_ms == first[0].start_ms + 1000
    # Its confirm pruned whatever had left the window by then; the sixth stays logged.
    assert members(r)[f"{sixth.id}:10"] == sixth.start_ms


def test_token_limit_binds(r: CountingRedis) -> None:
    throttle = make(r, rpm=100, tpm=100, window_s=1.0)
    a = throttle.acquire(60, max_wait=0)
    throttle.acquire(40, max_wait=0)  # exactly fills the budget
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0.5)
    c = throttle.acquire(1)
    assert c.start_ms == a.start_ms + 1000


def test_settle_changes_the_next_slot(r: CountingRedis) -> None:
    throttle = make(r, rpm=100, tpm=100, window_s=1.0)
    a = throttle.acquire(60, max_wait=0)
    throttle.acquire(40, max_wait=0)
    throttle.settle(a, 10)  # reserved 60, used 10
    assert throttle.usage() == WindowUsage(requests=2, tokens=50)
    throttle.acquire(50, max_wait=0)  # fits only because of the lower charge
    throttle.settle(a, 60)  # charged more after all: the next slot moves out
    assert throttle.usage().tokens == 150
    assert members(r)[f"{a.id}:60"] == a.start_ms
    d = throttle.acquire(1)
    assert d.start_ms == a.start_ms + 1000


def test_release_frees_a_slot(r: CountingRedis) -> None:
    throttle = make(r, rpm=2, tpm=1000, window_s=1.0)
    throttle.acquire(1, max_wait=0)
    b = throttle.acquire(1, max_wait=0)
    throttle.release(b)
    assert throttle.usage() == WindowUsage(requests=1, tokens=1)
    throttle.acquire(1, max_wait=0)
    assert throttle.usage().requests == 2


def test_request_too_large(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=100, window_s=1.0)
    with pytest.raises(RequestTooLarge, match=r"101 tokens .* only 100 tokens"):
        throttle.acquire(101)
    assert log_size(r) == 0
    throttle.acquire(100, max_wait=0)  # exactly the budget is fine


def test_timeout_takes_no_slot(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=2.0)
    a = throttle.acquire(1, max_wait=0)
    started = time.monotonic()
    with pytest.raises(ThrottleTimeout, match="beyond max_wait"):
        throttle.acquire(1, max_wait=0.5)
    assert time.monotonic() - started < 1.5  # refused up front, not after waiting
    assert log_size(r) == 1
    # Nothing was left behind: the next request gets the very slot the refused one saw.
    b = throttle.acquire(1, max_wait=2.5)
    assert b.start_ms == a.start_ms + 2000


def test_negative_max_wait_means_only_now(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=1.0)
    throttle.acquire(1, max_wait=-5)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=-5)


def test_pause_delays_waiting_and_new_reservations(r: CountingRedis) -> None:
    # Two-second window: the pause must land while the third reservation still sleeps.
    throttle = make(r, rpm=2, tpm=1000, window_s=2.0)
    a = throttle.acquire(1, max_wait=0)
    throttle.acquire(1, max_wait=0)
    with ThreadPoolExecutor(1) as pool:
        waiting: Future[Reservation] = pool.submit(throttle.acquire, 1)
        wait_until(lambda: log_size(r) == 3)
        planned = int(r.zrevrange(throttle_log_key(BUCKET), 0, 0, withscores=True)[0][1])
        assert planned == a.start_ms + 2000
        throttle.pause(2.5)
        pause_until = int(r.get(throttle_pause_key(BUCKET)) or 0)
        assert pause_until > planned
        assert 0 < throttle.paused_for() <= 2.5
        late = throttle.acquire(1)  # made during the pause
        moved = waiting.result(timeout=10)  # made before it, moved on confirm
    assert late.start_ms >= pause_until
    assert moved.start_ms >= pause_until
    assert throttle.paused_for() == 0.0
    log = members(r)
    assert log[f"{moved.id}:1"] == moved.start_ms
    assert planned not in log.values()  # the moved reservation left its old slot


def test_pause_never_shortens(r: CountingRedis) -> None:
    throttle = make(r, rpm=2, tpm=1000, window_s=1.0)
    throttle.pause(5)
    throttle.pause(1)
    assert throttle.paused_for() > 4
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=2)
    assert log_size(r) == 0


def test_pause_beyond_max_wait_during_sleep_times_out(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=2.0)
    a = throttle.acquire(1, max_wait=0)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(throttle.acquire, 1, max_wait=3)
        wait_until(lambda: log_size(r) == 2)
        throttle.pause(8)  # the sleeper wakes at 2 s and finds its new slot 8 s out
        with pytest.raises(ThrottleTimeout):
            waiting.result(timeout=10)
    # Only the first admission may remain (or nothing, once it left the window).
    assert set(members(r).values()) <= {a.start_ms}


def test_stop_event_interrupts_the_wait(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=30.0)
    throttle.acquire(1, max_wait=0)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(throttle.acquire, 1, stop=stop)
        wait_until(lambda: log_size(r) == 2)
        stop.set()
        with pytest.raises(ThrottleInterrupted):
            waiting.result(timeout=10)  # far sooner than the 30 s slot
    assert log_size(r) == 1
    with pytest.raises(ThrottleInterrupted):
        throttle.acquire(1, stop=stop)
    assert log_size(r) == 1


def test_bucket_keys_carry_ttls(r: CountingRedis) -> None:
    throttle = make(r, rpm=5, tpm=1000, window_s=1.0)
    throttle.acquire(1)
    throttle.pause(0.2)
    assert 0 < r.pttl(throttle_log_key(BUCKET)) <= 2000
    assert 0 < r.pttl(throttle_pause_key(BUCKET)) <= 200
    # The initialised marker lives exactly as long as the log: both go together.
    assert 0 < r.pttl(throttle_init_key(BUCKET)) <= 2000
    assert abs(r.pttl(throttle_init_key(BUCKET)) - r.pttl(throttle_log_key(BUCKET))) <= 50


def test_lua_matches_reference_on_random_logs(r: CountingRedis) -> None:
    rng = random.Random(20261129)
    log_key, pause_key = throttle_log_key(BUCKET), throttle_pause_key(BUCKET)
    for case in range(300):
        r.delete(log_key, pause_key, throttle_init_key(BUCKET))
        window_ms = rng.choice([50, 700, 5000, 60_000])
        rpm, tpm = rng.randint(1, 12), rng.randint(1, 2000)
        seconds, micros = r.time()
        now = seconds * 1000 + micros // 1000
        entries = [
            (now + rng.randint(-window_ms, 2 * window_ms), rng.randint(0, tpm))
            for _ in range(rng.randint(0, 20))
        ]
        for i, (score, tokens) in enumerate(entries):
            r.zadd(log_key, {f"e{i}:{tokens}": score})
        pause_until = 0
        if rng.random() < 0.3:
            pause_until = now + rng.randint(1, 3 * window_ms)
            r.set(pause_key, pause_until, px=pause_until - now)
        cost = rng.randint(0, tpm)
        store = ThrottleStore(r, BUCKET, window_ms=window_ms)
        decision = store.reserve(
            "new", cost, rpm=rpm, tpm=tpm, max_wait_ms=10**9, init=InitMode.SEED
        )
        expected = earliest_slot(
            entries,
            now_ms=decision.now_ms,
            pause_until_ms=pause_until,
            window_ms=window_ms,
            rpm=rpm,
            tpm=tpm,
            cost=cost,
        )
        assert decision.admitted
        assert decision.slot_ms == expected, f"case {case}"
        assert r.zscore(log_key, f"new:{cost}") == expected


# --- concurrency ----------------------------------------------------------------------

WINDOW_S = 1.0
RPM, TPM, MAX_COST = 20, 1000, 120


def assert_within_limits_and_busy(records: list[Admitted]) -> None:
    window_ms = int(WINDOW_S * 1000)
    requests, tokens = worst_window(records, window_ms)
    assert requests <= RPM
    assert tokens <= TPM
    assert not released_early(records)
    # Busy means close to the limit: each window admits at least min(rpm, tpm / max cost)
    # requests while demand exceeds the limit, so count whole windows minus one.
    starts = sorted(r.start_ms for r in records)
    windows = (starts[-1] - starts[0]) // window_ms
    assert windows >= 2
    assert len(records) >= min(RPM, TPM // MAX_COST) * (windows - 1)


def hammer(throttle: Throttle, stop: threading.Event, seed: int, out: list[Admitted]) -> int:
    """Acquire, settle at or below the reservation, repeat; return interruptions (0 or 1)."""
    rng = random.Random(seed)
    while not stop.is_set():
        cost = rng.randint(1, MAX_COST)
        try:
            reservation = throttle.acquire(cost, max_wait=60, stop=stop)
        except ThrottleInterrupted:
            return 1
        record = admitted(reservation)
        if rng.random() < 0.5:
            charged = rng.randint(cost // 2, cost)
            throttle.settle(reservation, charged)
            record = record._replace(tokens=charged)
        out.append(record)
    return 0


def test_threads_never_over_admit(r: CountingRedis) -> None:
    throttle = make(r, rpm=RPM, tpm=TPM, window_s=WINDOW_S)
    # Loads the scripts and seeds the bucket, so the count below is steady-state.
    throttle.release(throttle.acquire(0))
    stop = threading.Event()
    records: list[Admitted] = []
    before_server = command_calls(r)
    before_client = r.sent
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(hammer, throttle, stop, seed, records) for seed in range(40)]
        time.sleep(4.0)
        stop.set()
        interrupted = sum(f.result(timeout=30) for f in futures)
    sent = r.sent - before_client
    after_server = command_calls(r)
    assert_within_limits_and_busy(records)
    # reserve + confirm (if it slept) + settle per admitted call; reserve + release for
    # each interrupted one.
    assert sent <= 3 * len(records) + 2 * interrupted
    delta = {k: after_server.get(k, 0) - before_server.get(k, 0) for k in after_server}
    per_admitted = (sent - 2 * interrupted) / len(records)
    print(
        f"\nadmitted={len(records)} interrupted={interrupted} client commands={sent} "
        f"(~{per_admitted:.2f} per admitted call); worst window (requests, tokens)="
        f"{worst_window(records, int(WINDOW_S * 1000))}; server command deltas "
        "(server-wide, other clients included): "
        + ", ".join(f"{k}={v}" for k, v in sorted(delta.items()) if v)
    )


def process_worker(
    redis_url: str, seed: int, barrier: Any, results: Any, duration: float, threads: int = 6
) -> None:
    """One OS process with a few threads on the shared bucket; ships its admissions back."""
    client = redis.Redis.from_url(redis_url)
    throttle = Throttle(client, BUCKET, rpm=RPM, tpm=TPM, window_s=WINDOW_S, seed=no_history)
    stop = threading.Event()
    records: list[Admitted] = []
    barrier.wait()
    workers = [
        threading.Thread(target=hammer, args=(throttle, stop, seed * 100 + i, records))
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    time.sleep(duration)
    stop.set()
    for worker in workers:
        worker.join()
    client.close()
    results.put(records)


def test_processes_never_over_admit(r: CountingRedis, redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=process_worker, args=(redis_url, seed, barrier, results, 4.0))
        for seed in range(3)
    ]
    for process in processes:
        process.start()
    try:
        barrier.wait(timeout=60)
        records: list[Admitted] = []
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
    assert_within_limits_and_busy(records)
    print(
        f"\nprocesses: admitted={len(records)} worst window (requests, tokens)="
        f"{worst_window(records, int(WINDOW_S * 1000))}"
    )


# --- seeding a lost bucket ------------------------------------------------------------


def test_seeded_history_holds_admissions_until_it_ages_out(r: CountingRedis) -> None:
    limit = 5
    throttle = make(r, rpm=limit, tpm=10_000, window_s=1.0, seed=lambda: [(0.5, 10)] * limit)
    before = redis_now_ms(r)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0)
    seeded = [score for m, score in members(r).items() if m.startswith("s.")]
    assert len(seeded) == limit
    assert all(before - 500 <= score <= redis_now_ms(r) - 500 for score in seeded)
    assert throttle.usage() == WindowUsage(requests=limit, tokens=10 * limit)
    # The first new call starts when the history leaves the window, half a second on.
    first = throttle.acquire(1)
    assert first.start_ms == max(seeded) + 1000
    assert first.start_ms >= before + 500


def test_concurrent_first_acquirers_seed_once(r: CountingRedis) -> None:
    """Separate instances (as separate processes would) all read the history; one logs it."""
    instances, history = 6, [(0.1, 7)] * 3
    calls = 0
    calls_lock = threading.Lock()
    everyone_read = threading.Barrier(instances)

    def seed() -> list[tuple[float, int]]:
        nonlocal calls
        with calls_lock:
            calls += 1
        everyone_read.wait(timeout=10)  # all of them found the bucket unseeded
        return history

    throttles = [make(r, rpm=100, tpm=10_000, window_s=1.0, seed=seed) for _ in range(instances)]
    with ThreadPoolExecutor(instances) as pool:
        done = list(pool.map(lambda t: t.acquire(1, max_wait=0), throttles))
    assert calls == instances
    log = members(r)
    assert sum(1 for m in log if m.startswith("s.")) == len(history)
    assert sum(1 for m in log if m.startswith("b.")) == len(done) == instances
    assert throttles[0].usage().requests == instances + len(history)
    # Once initialised, nobody asks for the history again.
    throttles[0].acquire(1, max_wait=0)
    assert calls == instances


def test_threads_of_one_instance_read_the_history_once(r: CountingRedis) -> None:
    calls = 0

    def seed() -> list[tuple[float, int]]:
        nonlocal calls
        calls += 1
        time.sleep(0.2)  # a slow ledger query: the other threads queue behind it
        return [(0.1, 5)]

    throttle = make(r, rpm=100, tpm=10_000, window_s=1.0, seed=seed)
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda _: throttle.acquire(1, max_wait=0), range(10)))
    assert calls == 1
    assert throttle.usage() == WindowUsage(requests=11, tokens=15)


def test_without_seed_a_fresh_bucket_waits_one_window(r: CountingRedis) -> None:
    throttle = make(r, rpm=100, tpm=10_000, window_s=1.0, seed=None)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0.5)
    assert 0.5 < throttle.paused_for() <= 1.0
    pause_until = int(r.get(throttle_pause_key(BUCKET)) or 0)
    assert log_size(r) == 0
    first = throttle.acquire(1)
    assert first.start_ms >= pause_until
    # Initialised now: the next calls are admitted at once, no second pause.
    throttle.acquire(1, max_wait=0)
    assert r.exists(throttle_init_key(BUCKET)) == 1


def test_flushed_redis_is_reseeded_and_never_overfills(r: CountingRedis) -> None:
    rpm, tpm, window_ms = 10, 1000, 1000
    records: list[Admitted] = []
    records_lock = threading.Lock()
    seeded = 0

    def seed() -> list[tuple[float, int]]:
        # The ledger row follows the admission by a moment; let in-flight ones land.
        nonlocal seeded
        time.sleep(0.05)
        now = redis_now_ms(r)
        with records_lock:
            seeded += 1
            return [((now - s) / 1000, t) for s, t, _ in records if now - s < window_ms]

    throttle = make(r, rpm=rpm, tpm=tpm, window_s=window_ms / 1000, seed=seed)
    stop = threading.Event()

    def run(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            cost = rng.randint(1, 150)
            try:
                record = admitted(throttle.acquire(cost, max_wait=30, stop=stop))
            except ThrottleInterrupted:
                return
            with records_lock:
                records.append(record)

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(run, n) for n in range(12)]
        time.sleep(1.3)
        r.flushdb()  # Redis lost everything; the provider did not
        flushed_at = redis_now_ms(r)
        # The re-seeded window blocks for up to one window; then a whole window
        # more, so the "kept admitting" check does not hinge on a loaded machine.
        time.sleep(2.7)
        stop.set()
        for future in futures:
            future.result(timeout=30)
    assert seeded >= 2  # once at the start, again after the flush
    after = [a for a in records if a.start_ms >= flushed_at]
    assert len(after) >= rpm  # it kept admitting after the flush
    requests, tokens = worst_window(records, window_ms)
    assert requests <= rpm
    assert tokens <= tpm
    assert not released_early(records)


# --- round trips per admitted call ----------------------------------------------------


def test_redis_commands_per_admitted_call(r: CountingRedis, redis_url: str) -> None:
    """Immediate: reserve + settle. Waited: + confirm. Displaced bulk: + one more confirm."""
    warm = Throttle(r, "warm-up", rpm=5, tpm=1000, window_s=1.0, seed=no_history)
    warm.settle(warm.acquire(1), 1)  # loads the scripts and seeds nothing we measure
    # With rpm=1 the default share would allow no takeover at all (floor of 0.5).
    throttle = make(r, rpm=1, tpm=1000, window_s=1.0, interactive_share=1.0)
    throttle.release(throttle.acquire(1))  # initialises the bucket

    sent = r.sent
    immediate = throttle.acquire(10, max_wait=0)
    throttle.settle(immediate, 5)
    immediate_cost = r.sent - sent

    bulk_client = counting_client(redis_url)
    try:
        bulk_throttle = make(bulk_client, rpm=1, tpm=1000, window_s=1.0, interactive_share=1.0)
        with ThreadPoolExecutor(1) as pool:

            def bulk_call() -> Reservation:
                reservation = bulk_throttle.acquire(10)
                bulk_throttle.settle(reservation, 5)
                return reservation

            waiting: Future[Reservation] = pool.submit(bulk_call)
            wait_until(lambda: log_size(r) == 2)
            booked = members(r)
            sent = r.sent
            interactive = throttle.acquire(10, priority=0)  # takes the bulk slot over
            throttle.settle(interactive, 5)
            waited_cost = r.sent - sent
            displaced = waiting.result(timeout=10)
        displaced_cost = bulk_client.sent
    finally:
        bulk_client.close()
    assert interactive.start_ms == booked[f"{displaced.id}:10"]
    assert displaced.start_ms == interactive.start_ms + 1000
    print(
        f"\nRedis commands: immediate={immediate_cost} waited={waited_cost} "
        f"displaced bulk={displaced_cost}"
    )
    assert (immediate_cost, waited_cost, displaced_cost) == (2, 3, 4)
    # The throttle's own count (the worker's throttle_stats line) agrees with the client's.
    assert bulk_throttle.stats() == ThrottleStats(admitted=1, redis_round_trips=displaced_cost)
    assert throttle.stats().admitted == 3
