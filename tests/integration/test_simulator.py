"""The loopback chat-completions simulator, exercised over real sockets with httpx."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.simulator import Faults, SimCall, Simulator, SimulatorConfig, SimulatorStats
from devstack.simulator.server import peer_gone
from tests.support import HEROKU_EXAMPLE

pytestmark = pytest.mark.integration

KEY = "sim-key"
RESET_RE = re.compile(r"^(\d+ms|\d+(\.\d)?s)$")
REPO = Path(__file__).resolve().parents[2]


StartSim = Callable[..., Simulator]


def body(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "kimi-k2-5", "messages": [{"role": "user", "content": text}], **extra}


def post(
    client: httpx.Client, sim: Simulator, payload: object, key: str | None = KEY
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return client.post(f"{sim.url}/v1/chat/completions", json=payload, headers=headers)


def reset_seconds(value: str) -> float:
    assert RESET_RE.match(value), value
    return int(value[:-2]) / 1000 if value.endswith("ms") else float(value[:-1])


@pytest.fixture
def start_sim() -> Iterator[StartSim]:
    started: list[Simulator] = []

    def _start(**config: Any) -> Simulator:
        sim = Simulator(SimulatorConfig(**config)).start()
        started.append(sim)
        return sim

    yield _start
    for sim in started:
        sim.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as c:
        yield c


def test_auth_rejects_missing_and_wrong_keys_and_follows_rotation(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim()
    missing = post(client, sim, body(), key=None)
    wrong = post(client, sim, body(), key="wrong-key-123")
    for r in (missing, wrong):
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
    assert "wrong-key-123" not in wrong.text
    assert all("wrong-key-123" not in v for v in wrong.headers.values())
    assert post(client, sim, body()).status_code == 200

    sim.set_key("rotated-key")
    assert post(client, sim, body()).status_code == 401
    assert post(client, sim, body(), key="rotated-key").status_code == 200
    stats = sim.stats()
    assert (stats.calls, stats.ok, stats.client_errors) == (5, 2, 3)


TOOL_NO_SCHEMA = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "kimi-k2-5"}, "messages"),
        (body(messages=[]), "messages"),
        (
            {"model": "kimi-k2-5", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens="10"), "max_tokens"),
        (body(stream=True), "stream"),
        (body(tools=TOOL_NO_SCHEMA), "tools[0].function.parameters"),
        (
            body(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
            "tools[0].function.name",
        ),
        (body(tool_choice="required"), "tool_choice"),
        (
            {"model": "kimi-k2-5", "messages": [{"role": "user", "content": None}]},
            "messages[0].content",
        ),
        (
            {"model": "kimi-k2-5", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages[0].content",
        ),
        (
            {
                "model": "kimi-k2-5",
                "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}],
            },
            "messages[1].tool_call_id",
        ),
        (body(max_tokens=262_144), "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (["not", "an", "object"], None),
    ],
)
def test_validation_rejects_with_400_naming_the_param(
    start_sim: StartSim, client: httpx.Client, payload: object, param: str | None
) -> None:
    sim = start_sim()
    r = post(client, sim, payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] is None
    assert error["message"]
    stats = sim.stats()
    assert (stats.calls, stats.client_errors, stats.ok, stats.total_tokens) == (1, 1, 0, 0)


def test_unknown_model_invalid_json_and_unknown_paths(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim()
    r = post(client, sim, {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    r = client.post(
        f"{sim.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert client.get(f"{sim.url}/v1/chat/completions").status_code == 404
    assert client.post(f"{sim.url}/v1/completions", json={}).status_code == 404
    # Only calls to the chat endpoint are counted.
    assert sim.stats().calls == 2


def test_usage_is_deterministic_and_follows_chars_per_token(
    start_sim: StartSim, client: httpx.Client
) -> None:
    system = "You are terse."
    user = "Summarise the plot of a novel about a lighthouse keeper in one line."
    payload = {
        "model": "kimi-k2-5",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": user}]},
        ],
    }
    sim = start_sim(chars_per_token=4.0)
    first, second = post(client, sim, payload), post(client, sim, payload)
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert a["usage"] == b["usage"]
    assert a["choices"] == b["choices"]
    assert a["id"] != b["id"] and a["id"].startswith("chatcmpl-sim-")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert a["object"] == "chat.completion" and a["model"] == "kimi-k2-5"
    usage = a["usage"]
    assert usage["prompt_tokens"] == (4 + math.ceil(len(system) / 4)) + (
        4 + math.ceil(len(user) / 4)
    )
    assert 16 <= usage["completion_tokens"] <= 63
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    choice = a["choices"][0]
    assert choice["finish_reason"] == "stop"
    content = choice["message"]["content"]
    assert content.startswith("Simulated reply to: " + user[:40])
    assert len(content) == usage["completion_tokens"] * 4
    # No limits configured: no rate-limit headers.
    assert "x-ratelimit-limit-requests" not in first.headers
    stats = sim.stats()
    assert stats.prompt_tokens == 2 * usage["prompt_tokens"]
    assert stats.total_tokens == 2 * usage["total_tokens"]

    dense = start_sim(chars_per_token=2.0)
    r = post(client, dense, payload).json()
    assert r["usage"]["prompt_tokens"] == (4 + math.ceil(len(system) / 2)) + (
        4 + math.ceil(len(user) / 2)
    )

    capped = post(client, sim, {**payload, "max_tokens": 5}).json()
    assert capped["usage"]["completion_tokens"] == 5
    assert capped["choices"][0]["finish_reason"] == "length"


def test_tools_count_as_prompt_tokens(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim()
    payload = {**HEROKU_EXAMPLE, "tool_choice": "none"}
    r = post(client, sim, payload).json()
    tools_json = json.dumps(HEROKU_EXAMPLE["tools"], sort_keys=True, separators=(",", ":"))
    expected = sum(4 + math.ceil(len(m["content"]) / 4) for m in HEROKU_EXAMPLE["messages"])
    assert r["usage"]["prompt_tokens"] == expected + math.ceil(len(tools_json) / 4)


def test_tool_call_path(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim()
    r = post(client, sim, HEROKU_EXAMPLE)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Portland"}

    none = post(client, sim, {**HEROKU_EXAMPLE, "tool_choice": "none"}).json()["choices"][0]
    assert "tool_calls" not in none["message"] and isinstance(none["message"]["content"], str)

    second_tool = {"type": "function", "function": {"name": "get_time", "parameters": None}}
    named = {
        **HEROKU_EXAMPLE,
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [*HEROKU_EXAMPLE["tools"], second_tool],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }
    picked = post(client, sim, named).json()["choices"][0]["message"]["tool_calls"][0]
    assert picked["function"]["name"] == "get_time"
    assert json.loads(picked["function"]["arguments"]) == {}

    # A full tool round trip is valid input: assistant null content with tool_calls, then a
    # tool message answering it.
    follow_up = {
        "model": "kimi-k2-5",
        "messages": [
            *HEROKU_EXAMPLE["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_f": 54}'},
        ],
        "tools": HEROKU_EXAMPLE["tools"],
        "tool_choice": "required",
    }
    r = post(client, sim, follow_up)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"


def test_reasoning_path(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim()
    thinking = {"enabled": True, "budget_tokens": 1024, "include_reasoning": True}
    r = post(client, sim, body("Why is the sky blue?", extended_thinking=thinking)).json()
    reasoning = r["choices"][0]["message"]["reasoning"]
    assert isinstance(reasoning, str) and reasoning
    hidden = {"enabled": True, "budget_tokens": 1024}
    r = post(client, sim, body("Why is the sky blue?", extended_thinking=hidden)).json()
    assert "reasoning" not in r["choices"][0]["message"]


def test_rpm_sliding_window(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=5, window_s=1.5)
    responses = [post(client, sim, body(f"call {i}")) for i in range(6)]
    assert [r.status_code for r in responses] == [200] * 5 + [429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == [
        "4",
        "3",
        "2",
        "1",
        "0",
        "0",
    ]
    limited = responses[-1]
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert limited.headers["x-ratelimit-limit-requests"] == "5"
    assert "retry-after" not in limited.headers
    assert "x-ratelimit-limit-tokens" not in limited.headers
    wait = reset_seconds(limited.headers["x-ratelimit-reset-requests"])
    assert 0 < wait <= 1.5

    # The reset header is rounded up, so once it has elapsed one slot is free again.
    time.sleep(wait + 0.05)
    again = post(client, sim, body("after the window"))
    assert again.status_code == 200
    stats = sim.stats()
    assert (stats.ok, stats.rate_limited, stats.calls) == (6, 1, 7)
    assert stats.max_requests_in_window == 5


def test_retry_after_and_custom_code(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=1, window_s=30.0, retry_after=True, rate_limit_code="429")
    assert post(client, sim, body()).status_code == 200
    r = post(client, sim, body())
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "429"
    assert 29 <= int(r.headers["retry-after"]) <= 30


def test_without_ratelimit_headers_only_the_429_tells(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim(rpm=1, window_s=30.0, ratelimit_headers=False)
    first = post(client, sim, body())
    second = post(client, sim, body("refused"))
    assert (first.status_code, second.status_code) == (200, 429)
    for reply in (first, second):
        assert not [h for h in reply.headers if h.lower().startswith("x-ratelimit-")]
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert sim.stats().max_requests_in_window == 1


def test_concurrent_burst_admits_exactly_the_limit(start_sim: StartSim) -> None:
    sim = start_sim(rpm=10, window_s=30.0, latency_min=0.1, latency_max=0.2)

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as ac:
            tasks = [
                ac.post(
                    f"{sim.url}/v1/chat/completions",
                    json=body(f"burst {i}"),
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                for i in range(40)
            ]
            return [r.status_code for r in await asyncio.gather(*tasks)]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    stats = sim.stats()
    assert stats.max_requests_in_window == 10 and stats.duplicate_bodies == 0


def test_two_hundred_concurrent_connections(start_sim: StartSim) -> None:
    sim = start_sim(latency_min=0.5, latency_max=0.5)
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    async def one(ac: httpx.AsyncClient, i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        r = await ac.post(
            f"{sim.url}/v1/chat/completions",
            json=body(f"parallel {i}"),
            headers={"Authorization": f"Bearer {KEY}"},
        )
        with lock:
            in_flight -= 1
        return r.status_code

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as ac:
            return list(await asyncio.gather(*(one(ac, i) for i in range(220))))

    statuses = asyncio.run(run())
    assert statuses == [200] * 220
    assert peak == 220
    stats = sim.stats()
    assert stats.ok == 220 and stats.max_requests_in_window == 220


def test_tpm_reserve_charges_max_tokens_at_admission(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim(tpm=1000, window_s=30.0, charge="reserve")
    payload = body("a" * 40, max_tokens=300)  # prompt 4 + 10 = 14, cost 314
    responses = [post(client, sim, payload) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-tokens"] for r in responses] == [
        "686",
        "372",
        "58",
        "58",
    ]
    assert responses[-1].headers["x-ratelimit-limit-tokens"] == "1000"
    assert reset_seconds(responses[-1].headers["x-ratelimit-reset-tokens"]) > 0
    completion = responses[0].json()["usage"]["completion_tokens"]
    stats = sim.stats()
    assert stats.max_tokens_in_window == 942
    # Charged tokens are the actual usage of the answered calls, not the reservation.
    assert stats.total_tokens == 3 * (14 + completion)
    assert stats.duplicate_bodies == 1

    # A reservation larger than the whole budget can never be admitted.
    assert post(client, sim, body("b", max_tokens=5000)).status_code == 429


def test_tpm_actual_charges_prompt_plus_completion(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim(tpm=200, window_s=30.0, charge="actual")
    payload = body("a" * 40, max_tokens=5000)
    statuses = []
    for _ in range(10):
        statuses.append(post(client, sim, payload).status_code)
        if statuses[-1] == 429:
            break
    stats = sim.stats()
    per_call = stats.total_tokens // stats.ok
    assert statuses.count(200) == 200 // per_call
    assert statuses[-1] == 429
    assert stats.max_tokens_in_window == stats.ok * per_call <= 200


def test_error_fault_alternates_500_and_503_and_charges_nothing(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim(error_rate=1.0, rpm=100)
    responses = [post(client, sim, body()) for _ in range(4)]
    assert sorted(r.status_code for r in responses) == [500, 500, 503, 503]
    assert all(r.json()["error"]["type"] == "server_error" for r in responses)
    stats = sim.stats()
    assert (stats.server_errors, stats.ok, stats.total_tokens) == (4, 0, 0)
    assert stats.max_requests_in_window == 0


def test_malformed_fault(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(malformed_rate=1.0)
    r = post(client, sim, body())
    assert r.status_code == 200
    assert r.text.startswith('{"id": "chatcmpl-sim-')
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    stats = sim.stats()
    assert (stats.malformed, stats.ok, stats.total_tokens) == (1, 0, 0)


def test_hang_fault_trips_the_client_read_timeout(start_sim: StartSim) -> None:
    sim = start_sim(hang_rate=1.0, hang_seconds=2.0)
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.3)) as short,
        pytest.raises(httpx.ReadTimeout),
    ):
        post(short, sim, body())
    # The client gave up and closed its connection: the 504 has nobody to go to.
    stats, (call,) = settled(sim)
    assert (stats.hangs, stats.ok, stats.total_tokens) == (1, 0, 0)
    assert (call.outcome, call.delivered, stats.delivered, stats.cut) == ("hang", False, 0, 1)


def test_force_status(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=100, retry_after=True)
    sim.force_status(503, 0.5)
    assert post(client, sim, body()).status_code == 503
    assert post(client, sim, body(), key="not-even-the-right-key").status_code == 503
    deadline = time.monotonic() + 10
    while (status := post(client, sim, body()).status_code) == 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status == 200

    sim.force_status(429, 30)
    r = post(client, sim, body())
    assert r.status_code == 429
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(r.headers["retry-after"]) >= 1
    sim.force_status(429, 0)
    assert post(client, sim, body()).status_code == 200
    with pytest.raises(ValueError, match="400-599"):
        sim.force_status(200, 1)
    stats = sim.stats()
    assert stats.server_errors >= 2 and stats.rate_limited == 1 and stats.ok == 2


def test_duplicate_bodies(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim()
    for _ in range(3):
        post(client, sim, body("same"))
    post(client, sim, body("other"))
    assert sim.stats().duplicate_bodies == 1
    # Key order does not make a body different.
    post(client, sim, {"messages": [{"content": "other", "role": "user"}], "model": "kimi-k2-5"})
    assert sim.stats().duplicate_bodies == 2
    post(client, sim, body("same", max_tokens=0))  # a 400 is not an answered duplicate
    assert sim.stats().duplicate_bodies == 2


def test_stats_and_reset_endpoints(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=3, window_s=30.0)
    for _ in range(4):
        post(client, sim, body())
    remote = client.get(f"{sim.url}/stats").json()
    assert remote == sim.stats().as_dict()
    assert remote["ok"] == 3 and remote["rate_limited"] == 1
    assert client.post(f"{sim.url}/reset").status_code == 200
    assert all(v == 0 for v in sim.stats().as_dict().values())
    # The window is cleared too.
    assert post(client, sim, body()).status_code == 200


def test_stop_returns_promptly_with_a_hanging_request(start_sim: StartSim) -> None:
    sim = start_sim(hang_rate=1.0, hang_seconds=60.0)
    outcome: list[object] = []

    def call() -> None:
        with httpx.Client(timeout=30.0) as c:
            try:
                outcome.append(post(c, sim, body()).status_code)
            except httpx.TransportError as exc:
                outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while sim.stats().hangs == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    url = sim.url
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 5.0
    caller.join(timeout=10)
    assert not caller.is_alive()
    assert outcome and (outcome[0] == 504 or isinstance(outcome[0], httpx.TransportError))
    with httpx.Client(timeout=2.0) as c, pytest.raises(httpx.ConnectError):
        c.get(f"{url}/stats")


def test_standalone_cli() -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "devstack.simulator", "--port", "0", "--key", "cli-key-xyz"),
            *("--rpm", "150", "--tpm", "800000", "--latency", "0:0.01", "--charge", "reserve"),
            *("--call-log-limit", "10"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(timeout=10.0) as c:
            r = c.post(
                f"{url}/v1/chat/completions",
                json=body(),
                headers={"Authorization": "Bearer cli-key-xyz"},
            )
            assert r.status_code == 200
            assert r.headers["x-ratelimit-limit-requests"] == "150"
            assert c.get(f"{url}/stats").json()["ok"] == 1
            # A daemon simulator is inspected and steered over HTTP.
            (call,) = c.get(f"{url}/calls").json()["calls"]
            assert call["request_id"] == r.headers["x-request-id"]
            assert call["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
            assert c.post(f"{url}/faults", json={"error_rate": 1.0}).status_code == 200
            failed = c.post(
                f"{url}/v1/chat/completions",
                json=body(),
                headers={"Authorization": "Bearer cli-key-xyz"},
            )
            assert failed.status_code in (500, 503)
            assert c.post(f"{url}/faults", json={"error_rate": 0.0}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["ok"] == 1
    assert "cli-key-xyz" not in out + err


# -- the per-call log and runtime fault controls -----------------------------------------

COUNTER_OF = {
    "ok": "ok",
    "rate_limited": "rate_limited",
    "client_error": "client_errors",
    "server_error": "server_errors",
    "hang": "hangs",
    "malformed": "malformed",
}


def derived_stats(calls: list[SimCall], window_s: float) -> dict[str, int]:
    """The stats recomputed from the call records alone (brute force, independently)."""
    values = dict.fromkeys(
        (
            "calls",
            *COUNTER_OF.values(),
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "max_requests_in_window",
            "max_tokens_in_window",
            "duplicate_bodies",
            "delivered",
            "cut",
        ),
        0,
    )
    values["calls"] = len(calls)
    values["delivered"] = sum(c.delivered is True for c in calls)
    values["cut"] = sum(c.delivered is False for c in calls)
    for call in calls:
        values[COUNTER_OF[call.outcome]] += 1
        assert call.admitted == (call.outcome == "ok")
        assert (call.admitted_at is not None) == call.admitted
        if not call.admitted:
            assert (call.charged, call.prompt_tokens, call.completion_tokens) == (0, 0, 0)
    ok = [c for c in calls if c.outcome == "ok"]
    values["prompt_tokens"] = sum(c.prompt_tokens for c in ok)
    values["completion_tokens"] = sum(c.completion_tokens for c in ok)
    values["total_tokens"] = values["prompt_tokens"] + values["completion_tokens"]
    values["duplicate_bodies"] = sum(n >= 2 for n in Counter(c.body_hash for c in ok).values())
    admitted = [(c.admitted_at, c.charged) for c in ok if c.admitted_at is not None]
    for end, _ in admitted:
        inside = [tokens for at, tokens in admitted if end - window_s < at <= end]
        values["max_requests_in_window"] = max(values["max_requests_in_window"], len(inside))
        values["max_tokens_in_window"] = max(values["max_tokens_in_window"], sum(inside))
    return values


def settled(sim: Simulator, seconds: float = 10.0) -> tuple[SimulatorStats, list[SimCall]]:
    """The stats and the call records once every answer is written or found unwanted.

    A client holds its answer a moment before the server settles the call's record, so a
    test that reads the records right after its last response waits for that.
    """
    deadline = time.monotonic() + seconds
    while True:
        stats, calls = sim.snapshot()
        if all(c.delivered is not None for c in calls):
            return stats, calls
        assert time.monotonic() < deadline, [c for c in calls if c.delivered is None]
        time.sleep(0.01)


def poll_until_ok(client: httpx.Client, sim: Simulator, seconds: float = 10.0) -> list[int]:
    """Post until a 200 comes back; returns every status seen (the last one is 200)."""
    deadline = time.monotonic() + seconds
    statuses = [post(client, sim, body("polling")).status_code]
    while statuses[-1] != 200:
        assert time.monotonic() < deadline, statuses[-5:]
        time.sleep(0.05)
        statuses.append(post(client, sim, body("polling")).status_code)
    return statuses


def test_call_log_matches_responses_and_stats(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=4, window_s=30.0, charge="reserve", default_max_tokens=100)
    responses = [
        post(client, sim, body("tagged", user="job-1")),
        post(client, sim, body("tagged", user="job-1")),  # the same body again
        post(client, sim, body("capped", max_tokens=7)),
        post(client, sim, body(), key="wrong-key"),
        post(client, sim, body(max_tokens=0)),
        post(client, sim, body("long marker", user="m" * 1000)),
        post(client, sim, body("over the limit", user="job-2")),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 401, 400, 200, 429]
    stats, calls = settled(sim)
    assert [c.request_id for c in calls] == [r.headers["x-request-id"] for r in responses]
    assert [c.status for c in calls] == [r.status_code for r in responses]
    assert [c.outcome for c in calls] == [
        *("ok", "ok", "ok", "client_error", "client_error", "ok", "rate_limited"),
    ]
    for call, r in zip(calls, responses, strict=True):
        if r.status_code == 200:
            usage = r.json()["usage"]
            assert (call.prompt_tokens, call.completion_tokens) == (
                usage["prompt_tokens"],
                usage["completion_tokens"],
            )
    # Reserve mode charges the prompt plus max_tokens (or the default) at admission.
    assert calls[0].charged == calls[0].prompt_tokens + 100
    assert calls[2].charged == calls[2].prompt_tokens + 7
    assert [c.marker for c in calls] == ["job-1", "job-1", None, None, None, "m" * 256, "job-2"]
    assert calls[0].body_hash == calls[1].body_hash != calls[2].body_hash
    assert calls[3].body_hash is None and calls[4].body_hash is None
    assert calls[6].body_hash is not None
    admitted_at = [c.admitted_at for c in calls if c.admitted_at is not None]
    assert len(admitted_at) == 4 and admitted_at == sorted(admitted_at)
    assert all(c.delivered for c in calls)
    # Each call arrived, was admitted (if at all), then answered; one after another.
    for c in calls:
        assert c.settled_at is not None
        moments = [c.arrived_at, *([] if c.admitted_at is None else [c.admitted_at])]
        assert moments == sorted(moments) and moments[-1] <= c.settled_at, c
    arrivals = [c.arrived_at for c in calls]
    assert arrivals == sorted(arrivals)

    assert derived_stats(calls, 30.0) == stats.as_dict()
    assert (stats.ok, stats.duplicate_bodies, stats.max_requests_in_window) == (4, 1, 4)
    assert (stats.delivered, stats.cut) == (7, 0)

    sim.reset()
    assert sim.calls() == []
    assert post(client, sim, body()).status_code == 200
    (after,) = sim.calls()
    assert after.request_id == f"req-sim-{len(responses) + 1}"  # ids never repeat


def test_call_log_charge_actual_and_the_record_limit(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim(charge="actual", call_log_limit=3)
    responses = [post(client, sim, body(f"call {i}")) for i in range(5)]
    calls = sim.calls()
    assert [c.request_id for c in calls] == [r.headers["x-request-id"] for r in responses[-3:]]
    assert all(c.charged == c.prompt_tokens + c.completion_tokens for c in calls)
    assert sim.stats().calls == 5  # the counters still count every call

    silent = start_sim(call_log_limit=0)
    assert post(client, silent, body()).status_code == 200
    assert silent.calls() == [] and silent.stats().ok == 1
    with pytest.raises(ValueError, match="call_log_limit"):
        SimulatorConfig(call_log_limit=-1)


def test_call_log_and_stats_agree_during_a_concurrent_faulty_burst(start_sim: StartSim) -> None:
    sim = start_sim(
        rpm=25, window_s=30.0, error_rate=0.2, malformed_rate=0.2, latency_min=0.05,
        latency_max=0.1, seed=7,
    )  # fmt: skip
    snapshots: list[tuple[dict[str, int], list[SimCall]]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            stats, calls = sim.snapshot()
            snapshots.append((stats.as_dict(), calls))
            time.sleep(0.005)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=40)) as ac:
            tasks = [
                ac.post(
                    f"{sim.url}/v1/chat/completions",
                    json=body("same" if i % 10 == 0 else f"burst {i}", user=f"job-{i % 40}"),
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                for i in range(80)
            ]
            return list(await asyncio.gather(*tasks))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        responses = asyncio.run(burst())
    finally:
        done.set()
        watcher.join()
    stats, calls = sim.snapshot()
    snapshots.append((stats.as_dict(), calls))
    assert len(snapshots) >= 2
    for seen_stats, seen_calls in snapshots:
        assert derived_stats(seen_calls, 30.0) == seen_stats
    assert stats.calls == 80 and stats.ok == 25
    assert stats.server_errors > 0 and stats.malformed > 0 and stats.rate_limited > 0
    by_id = {c.request_id: c for c in calls}
    for r in responses:
        call = by_id[r.headers["x-request-id"]]
        assert call.status == r.status_code
        assert call.marker == json.loads(r.request.content)["user"]


def test_set_faults_changes_behaviour_at_runtime(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=100)
    assert post(client, sim, body()).status_code == 200
    faults = sim.set_faults(error_rate=1.0)
    assert faults.error_rate == 1.0 and faults.hang_seconds == 3600.0
    failing = [post(client, sim, body(f"fail {i}")).status_code for i in range(6)]
    assert sorted(set(failing)) == [500, 503]
    sim.set_faults(error_rate=0.0)
    assert post(client, sim, body()).status_code == 200

    sim.set_faults(malformed_rate=1.0)
    broken = post(client, sim, body())
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.text)
    sim.set_faults(malformed_rate=0.0, hang_rate=1.0, hang_seconds=0.2)
    assert post(client, sim, body()).status_code == 504
    sim.set_faults(hang_rate=0.0)
    assert post(client, sim, body()).status_code == 200

    for bad in ({"error_rate": 1.5}, {"hang_rate": -0.1}, {"hang_seconds": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sim.set_faults(**bad)
    assert sim.faults() == Faults(0.0, 0.0, 0.0, 0.2)  # unchanged by the refusals

    stats, calls = settled(sim)
    assert [c.status for c in calls] == [200, *failing, 200, 200, 504, 200]
    assert [c.outcome for c in calls[1:7]] == ["server_error"] * 6
    assert (calls[8].outcome, calls[9].outcome) == ("malformed", "hang")
    assert all(c.charged == 0 and not c.admitted for c in [*calls[1:7], *calls[8:10]])
    assert all(c.delivered for c in calls)
    assert derived_stats(calls, 60.0) == stats.as_dict()
    assert (stats.server_errors, stats.malformed, stats.hangs, stats.ok) == (6, 1, 1, 3)
    assert stats.max_requests_in_window == 3


def test_outage_answers_its_status_then_recovers(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=100, retry_after=True)
    assert post(client, sim, body()).status_code == 200
    sim.outage(30.0)
    down = post(client, sim, body("during the outage", user="job-9"))
    assert down.status_code == 503
    assert down.json()["error"]["type"] == "server_error"
    # Bad keys and bad bodies still get their own answers.
    assert post(client, sim, body(), key="wrong-key").status_code == 401
    assert post(client, sim, body(max_tokens=0)).status_code == 400

    sim.outage(30.0, status=429)
    limited = post(client, sim, body())
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(limited.headers["retry-after"]) >= 1

    sim.outage(1.0)  # a short one replaces it; poll until it is over
    statuses = poll_until_ok(client, sim)
    assert set(statuses[:-1]) <= {503}
    sim.outage(30.0)
    sim.outage(0)  # ends it early
    assert post(client, sim, body()).status_code == 200
    for seconds, status in ((1.0, 200), (-1.0, 503), (math.nan, 503)):
        with pytest.raises(ValueError, match="outage"):
            sim.outage(seconds, status)

    stats, calls = settled(sim)
    outage_calls = [c for c in calls if c.status in (503, 429)]
    assert len(outage_calls) == 2 + len(statuses) - 1
    assert all(not c.admitted and c.charged == 0 for c in outage_calls)
    assert all(c.body_hash is not None for c in outage_calls)
    assert calls[1].marker == "job-9"
    assert derived_stats(calls, 60.0) == stats.as_dict()
    assert stats.server_errors == len(outage_calls) - 1 and stats.rate_limited == 1
    assert stats.ok == stats.max_requests_in_window == 3


def test_calls_faults_and_outage_endpoints(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(rpm=100)
    r = client.post(f"{sim.url}/faults", json={"error_rate": 1.0, "hang_seconds": 5})
    assert r.status_code == 200
    assert r.json()["faults"] == {
        "error_rate": 1.0,
        "hang_rate": 0.0,
        "malformed_rate": 0.0,
        "hang_seconds": 5.0,
    }
    assert post(client, sim, body()).status_code in (500, 503)
    assert client.post(f"{sim.url}/faults", json={"error_rate": 0}).status_code == 200
    ok = post(client, sim, body())
    assert ok.status_code == 200

    for payload, field in (
        ({"bogus": 1}, "bogus"),
        ({"error_rate": 2}, "error_rate"),
        ({"error_rate": True}, "error_rate"),
        ({"hang_seconds": "5"}, "hang_seconds"),
        ([1, 2], "object"),
    ):
        refused = client.post(f"{sim.url}/faults", json=payload)
        assert refused.status_code == 400, payload
        assert field in refused.json()["error"]["message"]
    assert sim.faults().error_rate == 0.0

    assert client.post(f"{sim.url}/outage", json={"seconds": 30}).status_code == 200
    assert post(client, sim, body()).status_code == 503
    r = client.post(f"{sim.url}/outage", json={"seconds": 30, "status": 429})
    assert r.json() == {"outage": {"seconds": 30.0, "status": 429}}
    assert post(client, sim, body()).status_code == 429
    for payload, field in (
        ({"status": 503}, "seconds"),
        ({"seconds": 1, "status": 200}, "status"),
        ({"seconds": 1, "status": 502.5}, "status"),
        ({"seconds": -1}, "seconds"),
    ):
        refused = client.post(f"{sim.url}/outage", json=payload)
        assert refused.status_code == 400, payload
        assert field in refused.json()["error"]["message"]
    bad_json = client.post(f"{sim.url}/outage", content=b"{nope")
    assert bad_json.status_code == 400
    assert client.post(f"{sim.url}/outage", json={"seconds": 1}).status_code == 200
    poll_until_ok(client, sim)

    remote = client.get(f"{sim.url}/calls").json()
    stats, calls = sim.snapshot()
    assert remote == {"stats": stats.as_dict(), "calls": [c.as_dict() for c in calls]}
    assert remote["calls"][1]["request_id"] == ok.headers["x-request-id"]
    assert remote["calls"][1]["completion_tokens"] == ok.json()["usage"]["completion_tokens"]
    assert client.post(f"{sim.url}/reset").status_code == 200
    assert client.get(f"{sim.url}/calls").json()["calls"] == []
    # Wrong methods are unknown endpoints.
    assert client.get(f"{sim.url}/faults").status_code == 404
    assert client.post(f"{sim.url}/calls").status_code == 404


def test_call_log_keeps_the_callers_request_id(start_sim: StartSim, client: httpx.Client) -> None:
    sim = start_sim(key=KEY)
    headers = {"Authorization": f"Bearer {KEY}", "X-Client-Request-Id": "bi-5-1"}
    assert client.post(f"{sim.url}/v1/chat/completions", json=body(), headers=headers).is_success
    headers["Authorization"] = "Bearer wrong"
    headers["X-Client-Request-Id"] = "bi-5-2"
    assert (
        client.post(f"{sim.url}/v1/chat/completions", json=body(), headers=headers).status_code
        == 401
    )
    assert post(client, sim, body()).is_success
    assert [(c.client_request_id, c.status) for c in sim.calls()] == [
        ("bi-5-1", 200),
        ("bi-5-2", 401),
        (None, 200),
    ]


# -- whether an answer reached its client ---------------------------------------------------


def raw_chat(payload: object, key: str = KEY) -> bytes:
    """One chat-completions request as it goes on the wire."""
    data = json.dumps(payload).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def connect(sim: Simulator) -> socket.socket:
    url = httpx.URL(sim.url)
    assert url.port is not None
    return socket.create_connection((url.host, url.port), timeout=10.0)


def read_response(stream: Any) -> tuple[int, bytes]:
    """Status and body of the next response on a buffered socket file."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


def test_answers_to_connected_clients_are_recorded_delivered(
    start_sim: StartSim, client: httpx.Client
) -> None:
    sim = start_sim(rpm=2, latency_min=0.1, latency_max=0.1)
    # Sequential calls on one keep-alive connection, the last one refused.
    statuses = [post(client, sim, body(f"keep-alive {i}")).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    # Two requests in one write: the second one's bytes are waiting while the first is
    # answered, which must not look like a client gone.
    with connect(sim) as sock, sock.makefile("rb") as stream:
        sock.sendall(raw_chat(body("pipelined 1")) + raw_chat(body("pipelined 2")))
        pipelined = [read_response(stream)[0] for _ in range(2)]
    assert pipelined == [429, 429]
    sim.reset()
    with connect(sim) as sock, sock.makefile("rb") as stream:
        sock.sendall(raw_chat(body("pipelined 3")) + raw_chat(body("pipelined 4")))
        answers = [read_response(stream) for _ in range(2)]
    assert [status for status, _ in answers] == [200, 200]
    assert all(json.loads(data)["usage"]["completion_tokens"] > 0 for _, data in answers)
    stats, calls = settled(sim)
    assert [(c.outcome, c.delivered) for c in calls] == [("ok", True), ("ok", True)]
    assert (stats.delivered, stats.cut) == (2, 0)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_gone_during_the_latency_is_recorded_cut(
    start_sim: StartSim, client: httpx.Client, how: str
) -> None:
    sim = start_sim(rpm=10, latency_min=0.5, latency_max=0.5)
    sock = connect(sim)
    sock.sendall(raw_chat(body("cut short", user="job-cut")))
    wait_until_recorded(sim, 1)
    (pending,) = sim.calls()
    assert (pending.outcome, pending.delivered) == ("ok", None)  # still in its latency
    if how == "reset":  # as a process killed with unread bytes leaves it: an RST, not a FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    stats, (call,) = settled(sim)
    assert call == dataclasses.replace(pending, delivered=False, settled_at=call.settled_at)
    # Cut when its answer was ready, the latency after it arrived.
    assert call.settled_at is not None and call.settled_at - call.arrived_at >= 0.5
    assert (stats.ok, stats.delivered, stats.cut, stats.calls) == (1, 0, 1, 1)
    assert derived_stats([call], 60.0) == stats.as_dict()
    # Admitted all the same: the call still holds its place in the provider's window.
    again = post(client, sim, body("the next one"))
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "8"
    stats, calls = settled(sim)
    assert [c.delivered for c in calls] == [False, True]
    assert (stats.delivered, stats.cut, stats.max_requests_in_window) == (1, 1, 2)


def test_no_answer_is_written_to_a_client_that_closed_its_end(start_sim: StartSim) -> None:
    sim = start_sim(latency_min=0.3, latency_max=0.3)
    with connect(sim) as sock:
        sock.sendall(raw_chat(body("asked, then hung up")))
        # End of file from the client, as a killed process leaves it: nobody will read.
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536) == b""  # the connection closed without a byte of answer
    stats, (call,) = settled(sim)
    assert (call.outcome, call.delivered, stats.cut) == ("ok", False, 1)


def wait_until_recorded(sim: Simulator, n: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while len(sim.calls()) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_peer_gone_tells_a_closed_client_from_a_quiet_or_talking_one() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def pair() -> tuple[socket.socket, socket.socket]:
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = server.accept()
            conn.settimeout(300)  # as the handler's: a blocking read would hang the test
            return client, conn

        client, conn = pair()
        with client, conn:
            assert not peer_gone(conn)  # quiet: waiting for its answer
            client.sendall(b"GET /next")
            time.sleep(0.05)
            assert not peer_gone(conn)  # its next request is waiting
            assert conn.recv(100) == b"GET /next"  # and was not consumed
            client.shutdown(socket.SHUT_WR)
            time.sleep(0.05)
            assert peer_gone(conn)
        client, conn = pair()
        with conn:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            time.sleep(0.05)
            assert peer_gone(conn)  # reset
