"""``python -m devstack.simulator``: the simulator in the foreground, on a port of its own.

Runs until SIGINT or SIGTERM, then prints its stats as one JSON line. The key comes from
``$SIMULATOR_KEY`` (default), which keeps it out of ``ps``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from types import FrameType

from devstack.simulator.core import Simulator, SimulatorConfig


def _parse_latency(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground until SIGINT/SIGTERM, then print its stats."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack.simulator",
        description="OpenAI-compatible chat-completions simulator on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument(
        "--key",
        default=os.environ.get("SIMULATOR_KEY", SimulatorConfig.key),
        help="bearer key to accept (default: $SIMULATOR_KEY, which keeps it out of `ps`)",
    )
    parser.add_argument("--model", action="append", help="accepted model id (repeatable)")
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--window", type=float, default=60.0, help="sliding window, seconds")
    parser.add_argument("--charge", choices=("reserve", "actual"), default="reserve")
    parser.add_argument("--chars-per-token", type=float, default=4.0)
    parser.add_argument("--default-max-tokens", type=int, default=4096)
    parser.add_argument("--context-tokens", type=int, default=262_144)
    parser.add_argument(
        "--latency", type=_parse_latency, default=(0.0, 0.0), help="MIN:MAX seconds"
    )
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--hang-rate", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=3600.0)
    parser.add_argument("--malformed-rate", type=float, default=0.0)
    parser.add_argument("--retry-after", action="store_true", help="send Retry-After on 429")
    parser.add_argument(
        "--no-ratelimit-headers",
        dest="ratelimit_headers",
        action="store_false",
        help="send no x-ratelimit-* headers (only 429s show the limit)",
    )
    parser.add_argument("--rate-limit-code", default="rate_limit_exceeded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--call-log-limit",
        type=int,
        default=SimulatorConfig.call_log_limit,
        help="call records kept for GET /calls (oldest dropped first; 0 keeps none)",
    )
    args = parser.parse_args(argv)
    try:
        config = SimulatorConfig(
            key=args.key,
            models=frozenset(args.model or SimulatorConfig.models),
            rpm=args.rpm,
            tpm=args.tpm,
            window_s=args.window,
            charge=args.charge,
            chars_per_token=args.chars_per_token,
            default_max_tokens=args.default_max_tokens,
            context_tokens=args.context_tokens,
            latency_min=args.latency[0],
            latency_max=args.latency[1],
            error_rate=args.error_rate,
            hang_rate=args.hang_rate,
            hang_seconds=args.hang_seconds,
            malformed_rate=args.malformed_rate,
            retry_after=args.retry_after,
            ratelimit_headers=args.ratelimit_headers,
            rate_limit_code=args.rate_limit_code,
            seed=args.seed,
            call_log_limit=args.call_log_limit,
        )
    except ValueError as exc:
        parser.error(str(exc))
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sim = Simulator(config, host=args.host, port=args.port).start()
    print(sim.url, flush=True)
    while not done.wait(0.5):
        pass
    sim.stop()
    print(json.dumps(sim.stats().as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
