"""``python -m devstack``: the dev stack's commands.

| command | what it does |
|---|---|
| ``demo [--requests N]`` | the demo batch end to end on embedded defaults (``make demo``); |
|  | ``--pool N`` runs N simulators as N attachments of a pool |
| ``up`` | migrate, then the Procfile's long-running processes under honcho (``make up``),|
|  | printing the dashboard's URL and key |
| ``status`` | the embedded servers and simulator running under VAR_DIR |
| ``stop`` | stop them (``make stop``) |

Errors are one line on stderr with exit status 2, as in ``python -m jobs``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from devstack import daemons, services
from devstack.daemons import EmbeddedError
from devstack.demo import run_demo
from devstack.procs import ROOT
from jobs import environment, migrate
from jobs.environment import ServiceError
from jobs.settings import ConfigError, Settings

#: Procfile entries that exit once done, which ``up`` runs itself instead of honcho.
ONE_SHOT = ("release",)


def long_running(procfile: Path) -> list[str]:
    """The names of the Procfile's processes that run until stopped, in file order."""
    names = []
    for line in procfile.read_text().splitlines():
        name, sep, _ = line.partition(":")
        if sep and name.strip() and not name.startswith("#") and name.strip() not in ONE_SHOT:
            names.append(name.strip())
    return names


#: Where ``up`` serves the web process unless PORT says otherwise.
WEB_PORT = 8000


def cmd_up(args: argparse.Namespace) -> int:
    settings = environment.resolve(Settings.from_env(), web=True)
    assert settings.database_url is not None
    migrate.upgrade(settings.database_url)
    procfile = ROOT / "Procfile"
    names = long_running(procfile)
    argv = [sys.executable, "-m", "honcho", "-f", str(procfile), "-d", str(ROOT), "start", *names]
    env = environment.child_env(settings) | {"API_KEYS": ",".join(settings.api_keys)}
    # The Procfile says `python`: the one of this environment, as on a dyno.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lines = [f"running {', '.join(names)} from {procfile} (Ctrl-C stops them)"]
    if "web" in names:
        # honcho gives each process type PORT + 100 x its place: the web one gets web_port.
        web_port = int(os.environ.get("PORT") or WEB_PORT)
        env["PORT"] = str(web_port - 100 * names.index("web"))
        lines.append(
            f"dashboard: http://127.0.0.1:{web_port}/ (any user name; password: "
            f"{settings.api_keys[0]})"
        )
        lines.append(
            f"API: OpenAI(base_url='http://127.0.0.1:{web_port}/v1', api_key=<the same key>)"
        )
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # noqa: S606 - replaces this process


def cmd_status(args: argparse.Namespace) -> int:
    var_dir = daemons.var_dir_of(Settings.from_env())
    found = services.running(var_dir)
    for name, url in sorted(found.items()):
        sys.stdout.write(f"{name}: {url}\n")
    if not found:
        sys.stdout.write(f"nothing is running under {var_dir}\n")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    var_dir = daemons.var_dir_of(Settings.from_env())
    stopped = services.stop(var_dir)
    sys.stdout.write(f"stopped: {', '.join(stopped) or 'nothing was running'}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(requests=args.requests, out=sys.stdout, pool=args.pool)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devstack", description="The dev stack: demo, local processes, servers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo batch end to end on embedded defaults")
    p.add_argument("--requests", type=int, default=240, help="demo batch size (default 240)")
    p.add_argument(
        "--pool",
        type=int,
        default=1,
        choices=range(1, 5),
        metavar="N",
        help="run N simulators as N attachments of a pool, each its own key (1-4, default 1)",
    )
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("up", help="migrate, then run the Procfile's processes under honcho")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="the embedded servers and simulator under VAR_DIR")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stop", help="stop the embedded servers and simulator under VAR_DIR")
    p.set_defaults(func=cmd_stop)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, ServiceError, EmbeddedError) as exc:
        sys.stderr.write(f"devstack: error: {' '.join(str(exc).split()[:60])}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("devstack: interrupted\n")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
