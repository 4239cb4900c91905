"""The web process refuses what it must, with OpenAI's error body, and leaves nothing behind.

Keys: every route but /health needs one, compared against API_KEYS; the key never
reaches a log. Uploads: too large, not JSONL, a wrong purpose, a malformed body; ids
that do not exist; a batch request that is not JSON. Each is a 4xx, never a 500, and
no file or batch is left half-made.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from devstack.procs import WebProcess
from jobs.settings import Settings
from tests.support import WEB_KEY, jsonl, line, start_web

pytestmark = pytest.mark.integration

#: A small upload limit, so that going past it costs the test a few kilobytes.
LIMIT = 4096
WRONG = "sk-wrong-marker-8c1f"


@pytest.fixture
def web(settings: Settings, tmp_path: Path) -> Iterator[WebProcess]:
    process = start_web(settings, tmp_path / "web.log", MAX_UPLOAD_BYTES=str(LIMIT))
    yield process
    process.stop(10)


@pytest.fixture
def http(web: WebProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web.url, headers={"Authorization": f"Bearer {WEB_KEY}"}) as c:
        yield c


def rows(settings: Settings) -> tuple[int, int, int]:
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM files), (SELECT count(*) FROM file_chunks), "
            "(SELECT count(*) FROM batches)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def assert_error(reply: httpx.Response, status: int, code: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {WRONG}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic " + base64.b64encode(f"u:{WRONG}".encode()).decode()},
        {"Authorization": WEB_KEY},
    ],
    ids=["none", "wrong", "empty", "basic-wrong", "no-scheme"],
)
@pytest.mark.parametrize("path", ["/v1/files", "/v1/batches", "/v1/batches/batch_1", "/"])
def test_a_request_without_a_valid_key_gets_401(
    web: WebProcess, headers: dict[str, str], path: str
) -> None:
    reply = httpx.get(f"{web.url}{path}", headers=headers)
    assert_error(reply, 401, "invalid_api_key")
    assert reply.json()["error"]["type"] == "authentication_error"
    # The API says so in JSON; the dashboard also asks a browser for the key.
    assert ("www-authenticate" in reply.headers) == (not path.startswith("/v1/"))


def test_health_is_open_and_every_key_of_the_list_works(settings: Settings, tmp_path: Path) -> None:
    web = start_web(settings, tmp_path / "web.log", API_KEYS=f"old-key-1, {WEB_KEY}")
    try:
        assert httpx.get(f"{web.url}/health").status_code == 200
        for key in ("old-key-1", WEB_KEY):
            reply = httpx.get(f"{web.url}/v1/batches", headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 200, reply.text
        log = web.log()
    finally:
        web.stop(10)
    assert "old-key-1" not in log and WEB_KEY not in log


def test_no_key_reaches_the_log(web: WebProcess, http: httpx.Client) -> None:
    httpx.get(f"{web.url}/v1/files", headers={"Authorization": f"Bearer {WRONG}"})
    http.get("/v1/files")
    http.get("/v1/files/file-missing")
    assert "GET /v1/files" in web.log(), "the access log is on"
    assert WEB_KEY not in web.log() and WRONG not in web.log()


def test_uploads_that_are_refused_leave_nothing(settings: Settings, http: httpx.Client) -> None:
    good = jsonl(line("a"))
    cases = [
        ({"file": ("big.jsonl", good * (LIMIT // len(good) + 2))}, {"purpose": "batch"}, 413,
         "file_too_large"),
        ({"file": ("x.jsonl", b"not json at all\n")}, {"purpose": "batch"}, 400, "invalid_file"),
        ({"file": ("x.jsonl", b"[1, 2]\n")}, {"purpose": "batch"}, 400, "invalid_file"),
        ({"file": ("x.jsonl", good)}, {"purpose": "fine-tune"}, 400, "invalid_purpose"),
        ({"file": ("x.jsonl", good)}, {}, 400, "invalid_purpose"),
        ({"file": ("x.jsonl", b"")}, {"purpose": "batch"}, 400, "empty_file"),
        ({}, {"purpose": "batch"}, 400, "invalid_request"),
    ]  # fmt: skip
    for files, data, status, code in cases:
        assert_error(http.post("/v1/files", files=files, data=data), status, code)
    malformed = http.post(
        "/v1/files",
        content=b'--zz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=zz"},
    )
    assert malformed.status_code == 400, malformed.text
    not_multipart = http.post("/v1/files", json={"file": "x"})
    assert_error(not_multipart, 400, "invalid_request")
    assert rows(settings) == (0, 0, 0)


def test_unknown_ids_and_bad_batch_requests_are_4xx(settings: Settings, http: httpx.Client) -> None:
    for path in ("/v1/files/file-nope", "/v1/files/file-nope/content", "/v1/batches/batch_99",
                 "/v1/batches/nonsense", "/v1/nowhere"):  # fmt: skip
        assert_error(http.get(path), 404)
    assert_error(http.delete("/v1/files/file-nope"), 404)
    assert_error(http.post("/v1/batches/batch_99/cancel"), 404)
    bodies: list[tuple[bytes, str]] = [
        (b"{not json", "invalid_json"),
        (b"[]", "invalid_json"),
        (json.dumps({"endpoint": "/v1/chat/completions", "completion_window": "24h"}).encode(),
         "missing_parameter"),
    ]  # fmt: skip
    for body, code in bodies:
        assert_error(http.post("/v1/batches", content=body), 400, code)
    missing = {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}
    assert_error(http.post("/v1/batches", json=missing | {"completion_window": "24h"}), 404)
    uploaded = http.post(
        "/v1/files", files={"file": ("a.jsonl", jsonl(line("a")))}, data={"purpose": "batch"}
    ).json()["id"]
    request = {"input_file_id": uploaded, "endpoint": "/v1/chat/completions"}
    assert_error(http.post("/v1/batches", json=request | {"completion_window": "soon"}), 400)
    too_much = {f"k{i}": "v" for i in range(17)}
    assert_error(
        http.post("/v1/batches", json=request | {"completion_window": "1h", "metadata": too_much}),
        400,
    )
    assert rows(settings)[2] == 0, "no batch was left behind"
