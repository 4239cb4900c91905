"""Webhook events: their body, their signature as the ``openai`` SDK checks it, the backoff."""

from __future__ import annotations

import datetime as dt
import json
import time

import openai
import pytest
from openai.types.webhooks import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
)

from jobs import webhooks
from jobs.settings import ConfigError, Settings

#: Standard Webhooks' reference vector (the spec's and its libraries' own tests).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

EVENT_ID = "evt_0123456789abcdef01234567"
CREATED = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
#: Any timestamp signed long ago passes the SDK's age check with this tolerance.
FOREVER = 10**10

SDK = openai.OpenAI(api_key="unused", webhook_secret=SPEC_SECRET)


def test_the_signature_is_the_standard_webhooks_reference_one() -> None:
    assert webhooks.sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    SDK.webhooks.verify_signature(SPEC_BODY, headers, tolerance=FOREVER)


def test_an_event_of_ours_has_a_known_body_and_signature_the_sdk_accepts() -> None:
    body = webhooks.event_body(EVENT_ID, "batch.completed", CREATED, 12)
    assert body == (
        b'{"id":"evt_0123456789abcdef01234567","object":"event","type":"batch.completed",'
        b'"created_at":1767323045,"data":{"id":"batch_12"}}'
    )
    headers = webhooks.signed_headers(SPEC_SECRET, EVENT_ID, body, 1767323050)
    assert headers == {
        "content-type": "application/json",
        "webhook-id": EVENT_ID,
        "webhook-timestamp": "1767323050",
        "webhook-signature": "v1,5M7yLdXrSkv57oSti5msFD8TsUvJyc9I4MOE0eXiD2Y=",
    }
    SDK.webhooks.verify_signature(body, headers, tolerance=FOREVER)


@pytest.mark.parametrize(
    ("event_type", "model"),
    [
        ("batch.completed", BatchCompletedWebhookEvent),
        ("batch.failed", BatchFailedWebhookEvent),
        ("batch.expired", BatchExpiredWebhookEvent),
        ("batch.cancelled", BatchCancelledWebhookEvent),
    ],
)
def test_unwrap_parses_each_event_into_the_sdk_s_type(event_type: str, model: type) -> None:
    body = webhooks.event_body(EVENT_ID, event_type, CREATED, 7)
    headers = webhooks.signed_headers(SPEC_SECRET, EVENT_ID, body, int(time.time()))
    event = SDK.webhooks.unwrap(body, headers)
    assert isinstance(event, model)
    model.model_validate(json.loads(body))  # every field present, of its type
    assert (event.id, event.type, event.data.id) == (EVENT_ID, event_type, "batch_7")
    assert event.created_at == int(CREATED.timestamp())


def test_a_changed_body_an_other_secret_or_an_old_timestamp_is_refused() -> None:
    body = webhooks.event_body(EVENT_ID, "batch.completed", CREATED, 12)
    now = int(time.time())
    headers = webhooks.signed_headers(SPEC_SECRET, EVENT_ID, body, now)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.verify_signature(body.replace(b"12", b"13"), headers)
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.verify_signature(body, headers, secret=other)
    stale = webhooks.signed_headers(SPEC_SECRET, EVENT_ID, body, now - 301)
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        SDK.webhooks.verify_signature(body, stale)


def test_the_backoff_doubles_with_equal_jitter_up_to_its_cap() -> None:
    for attempts, bound in ((1, 5.0), (2, 10.0), (3, 20.0), (10, 2560.0), (11, 3600.0)):
        for _ in range(50):
            assert bound / 2 <= webhooks.retry_delay(attempts, 5.0, 3600.0) <= bound
    assert webhooks.retry_delay(10_000, 5.0, 3600.0) <= 3600.0


def test_webhook_settings_and_their_defaults() -> None:
    settings = Settings.from_env(
        {"WEBHOOK_URL": "https://hooks.example/x", "WEBHOOK_SECRET": SPEC_SECRET}
    )
    assert (settings.webhook_backoff_base, settings.webhook_backoff_max) == (5.0, 3600.0)
    assert SPEC_SECRET not in repr(settings)
    faster = Settings.from_env(
        {
            "WEBHOOK_URL": "http://127.0.0.1:9/hook",
            "WEBHOOK_SECRET": SPEC_SECRET,
            "WEBHOOK_BACKOFF_BASE": "0.2",
            "WEBHOOK_BACKOFF_MAX": "1",
        }
    )
    assert (faster.webhook_backoff_base, faster.webhook_backoff_max) == (0.2, 1.0)
    assert Settings.from_env({}).webhook_url is None


@pytest.mark.parametrize(
    "secret", ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!"]
)
def test_a_secret_that_is_not_whsec_and_base64_is_refused_without_being_shown(
    secret: str,
) -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET") as caught:
        Settings.from_env({"WEBHOOK_URL": "https://hooks.example/x", "WEBHOOK_SECRET": secret})
    shown = secret.removeprefix("whsec_")
    assert not shown or shown not in str(caught.value)


def test_a_plain_http_receiver_must_be_on_loopback() -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_URL"):
        Settings.from_env({"WEBHOOK_URL": "http://hooks.example/x", "WEBHOOK_SECRET": SPEC_SECRET})
