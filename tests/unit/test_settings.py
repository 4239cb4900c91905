"""Settings come from the environment once, with documented defaults."""

from __future__ import annotations

import dataclasses
import re
import ssl

import pytest

from jobs.attachments import Attachment, pool_variables
from jobs.connections import celery_config, redis_client
from jobs.pricing import Price
from jobs.settings import ConfigError, Settings, normalize_database_url
from jobs.validation import ValidationError, check_request, request_limits


def test_defaults_come_from_the_model_table() -> None:
    settings = Settings.from_env({})
    assert settings.model_id == "kimi-k2-5"
    assert (settings.rpm, settings.tpm, settings.context_tokens) == (150, 800_000, 262_144)
    assert settings.tpm_charge == "reserve"
    assert settings.interactive_reserve == 0
    assert Settings.from_env({"INFERENCE_INTERACTIVE_RESERVE": "15"}).interactive_reserve == 15
    assert settings.headroom == 0.0
    assert Settings.from_env({"INFERENCE_HEADROOM": "0.2"}).headroom == 0.2
    assert settings.simulated
    assert settings.database_url is None and settings.redis_url is None


def test_explicit_limits_override_the_table() -> None:
    settings = Settings.from_env({"INFERENCE_RPM": "30", "INFERENCE_TPM": "1000"})
    assert (settings.rpm, settings.tpm) == (30, 1000)


def test_one_process_keeps_threads_for_interactive_jobs_beyond_the_window() -> None:
    # A single worker may hold every published bulk job; interactive ones need more threads.
    settings = Settings.from_env({})
    assert settings.worker_concurrency >= settings.dispatch_window_max + 50
    fewer = Settings.from_env({"WORKER_CONCURRENCY": "300"})
    assert fewer.dispatch_window_max == 250


def test_the_dispatch_window_follows_the_request_limit_and_the_calls() -> None:
    # A whole minute's requests must be published to start at one window roll; calls
    # of up to two minutes in flight on top of that, at most.
    settings = Settings.from_env({})
    assert (settings.dispatch_window, settings.dispatch_window_max) == (200, 450)
    assert settings.dispatch_redeliver_after == 2 * 60.0 * 450 / 150
    raised = Settings.from_env({"INFERENCE_RPM": "1500", "INFERENCE_TPM": "8000000"})
    # Beyond what one process's threads can hold, the window stays at its floor.
    assert (raised.dispatch_window, raised.dispatch_window_max) == (1550, 1550)
    assert raised.worker_concurrency == 500
    assert raised.dispatch_redeliver_after == 2 * 60.0 * 1550 / 1500
    explicit = Settings.from_env({"INFERENCE_RPM": "1500", "DISPATCH_WINDOW": "300"})
    assert (explicit.dispatch_window, explicit.dispatch_window_max) == (300, 300)
    both = Settings.from_env({"DISPATCH_WINDOW": "100", "DISPATCH_WINDOW_MAX": "900"})
    assert (both.dispatch_window, both.dispatch_window_max) == (100, 900)
    with pytest.raises(ConfigError, match="DISPATCH_WINDOW_MAX must be at least 100"):
        Settings.from_env({"DISPATCH_WINDOW": "100", "DISPATCH_WINDOW_MAX": "50"})


def test_unknown_model_needs_its_limits() -> None:
    with pytest.raises(ConfigError, match="INFERENCE_RPM and INFERENCE_TPM"):
        Settings.from_env({"INFERENCE_MODEL_ID": "mystery-1"})
    settings = Settings.from_env(
        {"INFERENCE_MODEL_ID": "mystery-1", "INFERENCE_RPM": "10", "INFERENCE_TPM": "5000"}
    )
    assert (settings.model_id, settings.rpm, settings.tpm) == ("mystery-1", 10, 5000)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ],
)
def test_database_url_is_rewritten_for_psycopg(raw: str, expected: str) -> None:
    assert normalize_database_url(raw) == expected
    assert Settings.from_env({"DATABASE_URL": raw}).database_url == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("INFERENCE_RPM", "fast", "INFERENCE_RPM must be an integer"),
        ("INFERENCE_RPM", "0", "INFERENCE_RPM must be at least 1"),
        ("INFERENCE_READ_TIMEOUT", "-1", "INFERENCE_READ_TIMEOUT must be positive"),
        ("INFERENCE_TPM_CHARGE", "later", "INFERENCE_TPM_CHARGE must be"),
        ("INFERENCE_INTERACTIVE_RESERVE", "-1", "INFERENCE_INTERACTIVE_RESERVE must be at least 0"),
        ("INFERENCE_INTERACTIVE_RESERVE", "150", "INFERENCE_INTERACTIVE_RESERVE must be below"),
        ("INFERENCE_HEADROOM", "-0.1", "INFERENCE_HEADROOM must be zero or more"),
        ("INFERENCE_HEADROOM", "0.6", "INFERENCE_HEADROOM must be at most 0.5"),
        ("INFERENCE_PRICE_INPUT", "0.6", "INFERENCE_PRICE_INPUT is set but INFERENCE_PRICE_OUTPUT"),
        ("INFERENCE_PRICE_OUTPUT", "3", "INFERENCE_PRICE_OUTPUT is set but INFERENCE_PRICE_INPUT"),
        ("DAILY_BUDGET_TOKENS", "lots", "DAILY_BUDGET_TOKENS must be an integer, got 'lots'"),
        ("DAILY_BUDGET_TOKENS", "0", "DAILY_BUDGET_TOKENS must be at least 1, got 0"),
        ("DAILY_BUDGET_USD", "-2", "DAILY_BUDGET_USD must be positive, got -2"),
        (
            "DAILY_BUDGET_USD",
            "5",
            "DAILY_BUDGET_USD needs the price of kimi-k2-5: set INFERENCE_PR",
        ),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({name: value})


def test_plain_http_is_refused_except_on_loopback() -> None:
    with pytest.raises(ConfigError, match="https"):
        Settings.from_env({"INFERENCE_URL": "http://inference.example.com"})
    assert Settings.from_env({"INFERENCE_URL": "http://127.0.0.1:8000/"}).inference_url == (
        "http://127.0.0.1:8000"
    )
    assert Settings.from_env({"INFERENCE_URL": "https://us.inference.heroku.com"}).inference_url


def test_key_is_hidden_and_bucket_is_shared_per_key() -> None:
    a = Settings.from_env({"INFERENCE_KEY": "inf-secret-123"})
    b = Settings.from_env({"INFERENCE_KEY": "inf-secret-123", "DATABASE_URL": "postgres://x/y"})
    c = Settings.from_env({"INFERENCE_KEY": "inf-other"})
    assert "inf-secret-123" not in repr(a)
    assert "inf-secret-123" not in a.bucket_name
    assert a.bucket_name == b.bucket_name != c.bucket_name
    assert a.bucket_name.startswith("kimi-k2-5:")


def test_rediss_everywhere_skips_certificate_checks() -> None:
    settings = Settings(redis_url="rediss://:pw@example.com:6380/0")
    config = celery_config(settings)
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert config["redbeat_redis_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert config["broker_transport"] == "bi-rediss"
    assert celery_config(Settings(redis_url="redis://h/0"))["broker_transport"] == "bi-redis"
    client = redis_client("rediss://:pw@example.com:6380/0")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_NONE
    client.close()


def test_celery_settings_for_long_io_bound_jobs() -> None:
    config = celery_config(Settings(redis_url="redis://127.0.0.1:6379/0"))
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_use_ssl"] is None
    assert config["broker_transport_options"]["visibility_timeout"] == 3600


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, 30), ("", 30), ("0", 0), ("7", 7), (" 90 ", 90), ("3650", 3650)],
)
def test_result_retention_days(raw: str | None, expected: int) -> None:
    env = {} if raw is None else {"RESULT_RETENTION_DAYS": raw}
    assert Settings.from_env(env).result_retention_days == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("-1", "RESULT_RETENTION_DAYS must be at least 0, got -1"),
        ("30d", "RESULT_RETENTION_DAYS must be an integer, got '30d'"),
        ("1.5", "RESULT_RETENTION_DAYS must be an integer"),
        ("forever", "RESULT_RETENTION_DAYS must be an integer"),
    ],
)
def test_bad_result_retention_days_names_the_variable(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"RESULT_RETENTION_DAYS": raw})


def test_purge_cron_default_and_override() -> None:
    assert Settings.from_env({}).purge_cron == "0 4 * * *"
    assert Settings.from_env({"PURGE_CRON": "15 1 * * 0"}).purge_cron == "15 1 * * 0"


@pytest.mark.parametrize("value", ["cheap", "-0.5", "nan", "inf"])
def test_a_price_must_be_a_number_of_dollars(value: str) -> None:
    env = {"INFERENCE_PRICE_INPUT": value, "INFERENCE_PRICE_OUTPUT": "3"}
    with pytest.raises(ConfigError, match="INFERENCE_PRICE_INPUT must be a price in USD"):
        Settings.from_env(env)


def test_prices_are_per_model_and_none_is_invented() -> None:
    assert Settings.from_env({}).price is None  # Heroku publishes none for kimi-k2-5
    settings = Settings.from_env({"INFERENCE_PRICE_INPUT": "0.6", "INFERENCE_PRICE_OUTPUT": "3"})
    assert settings.price_for("kimi-k2-5") == Price(input=0.6, output=3.0)
    assert settings.price_for("another-model") is None
    assert Price(input=0.6, output=3.0).usd(1_000_000, 100_000) == pytest.approx(0.9)


def test_a_daily_budget_is_read_once_with_its_price() -> None:
    env = {
        "DAILY_BUDGET_USD": "12.5",
        "INFERENCE_PRICE_INPUT": "0.6",
        "INFERENCE_PRICE_OUTPUT": "3",
    }
    settings = Settings.from_env(env | {"DAILY_BUDGET_TOKENS": "2000000"})
    assert (settings.daily_budget_tokens, settings.daily_budget_usd) == (2_000_000, 12.5)
    assert Settings.from_env({}).daily_budget_tokens is None


POOL = {
    "INFERENCE_POOL": "INFERENCE,INFERENCE_2",
    "INFERENCE_URL": "https://a.example",
    "INFERENCE_KEY": "key-a",
    "INFERENCE_2_URL": "https://b.example/",
    "INFERENCE_2_KEY": "key-b",
    "INFERENCE_2_MODEL_ID": "kimi-k2-5",
}


def test_without_a_pool_the_one_attachment_is_inference() -> None:
    s = Settings.from_env({"INFERENCE_URL": "https://a.example", "INFERENCE_KEY": "k"})
    (only,) = s.attachments
    assert (only.alias, only.url, only.rpm, only.tpm) == (
        "INFERENCE",
        "https://a.example",
        150,
        800_000,
    )
    assert only.bucket_name == s.bucket_name and s.pool_rpm == 150
    assert s.served_models == {"kimi-k2-5"}


def test_a_pool_reads_each_attachment_from_its_alias() -> None:
    s = Settings.from_env(POOL | {"INFERENCE_2_RPM": "200", "INFERENCE_2_HEADROOM": "0.1"})
    first, second = s.attachments
    assert (first.alias, first.url, first.rpm, first.headroom) == (
        "INFERENCE",
        "https://a.example",
        150,
        0.0,
    )
    assert (second.alias, second.url, second.rpm, second.tpm, second.headroom) == (
        "INFERENCE_2",
        "https://b.example",
        200,
        800_000,
        0.1,
    )
    assert second.limits_from_env == ("INFERENCE_2_RPM",)
    assert "key-b" not in repr(s) and "key-b" not in second.bucket_name
    assert first.bucket_name != second.bucket_name
    # The dispatcher feeds both buckets, the dry run paces the model on both.
    assert s.pool_rpm == 350 and s.limits_for("kimi-k2-5") == (350, 1_600_000)
    assert s.dispatch_window == 400 and s.dispatch_window_max == 450
    # INFERENCE_HEADROOM is every attachment's default; its own overrides it.
    s = Settings.from_env(POOL | {"INFERENCE_HEADROOM": "0.2"})
    assert [a.headroom for a in s.attachments] == [0.2, 0.2]


def test_the_first_alias_of_the_pool_need_not_be_inference() -> None:
    env = {k: v for k, v in POOL.items() if not k.startswith("INFERENCE_URL")}
    env |= {"INFERENCE_POOL": "INFERENCE_2,INFERENCE_3", "INFERENCE_3_URL": "https://c.example"}
    env |= {"INFERENCE_3_KEY": "key-c"}
    s = Settings.from_env(env)
    assert (s.alias, s.inference_url, [a.alias for a in s.attachments]) == (
        "INFERENCE_2",
        "https://b.example",
        ["INFERENCE_2", "INFERENCE_3"],
    )


def test_two_aliases_with_one_key_share_a_bucket_and_its_limits() -> None:
    same = POOL | {"INFERENCE_2_KEY": "key-a"}
    s = Settings.from_env(same)
    assert s.attachments[0].bucket_name == s.attachments[1].bucket_name
    assert s.pool_rpm == 150  # one bucket: its limit counts once
    with pytest.raises(ConfigError, match="INFERENCE_2 carries the same key as INFERENCE"):
        Settings.from_env(same | {"INFERENCE_2_RPM": "300"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"INFERENCE_POOL": "INFERENCE,inference_2"},
            "INFERENCE_POOL must list attachment aliases",
        ),
        ({"INFERENCE_POOL": "INFERENCE,INFERENCE"}, "INFERENCE_POOL names INFERENCE twice"),
        (
            {"INFERENCE_2_URL": ""},
            "INFERENCE_2_URL is not set, and INFERENCE_POOL names INFERENCE_2",
        ),
        (
            {"INFERENCE_2_KEY": ""},
            "INFERENCE_2_KEY is not set, and INFERENCE_POOL names INFERENCE_2",
        ),
        ({"INFERENCE_2_URL": "http://b.example"}, "INFERENCE_2_URL must be https://"),
        (
            {"INFERENCE_2_MODEL_ID": "llama"},
            "INFERENCE_2_MODEL_ID='llama' has no known rate limits",
        ),
        ({"INFERENCE_2_RPM": "0"}, "INFERENCE_2_RPM must be at least 1"),
        ({"INFERENCE_2_HEADROOM": "0.9"}, "INFERENCE_2_HEADROOM must be at most 0.5"),
        (
            {"INFERENCE_2_PRICE_INPUT": "1"},
            "INFERENCE_2_PRICE_INPUT is set but INFERENCE_2_PRICE_OUTPUT",
        ),
        (
            {"INFERENCE_2_RPM": "10", "INFERENCE_INTERACTIVE_RESERVE": "20"},
            "INFERENCE_INTERACTIVE_RESERVE must be below the rpm (10 of INFERENCE_2), got 20",
        ),
    ],
)
def test_a_bad_pool_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(POOL | env)


def test_a_price_belongs_to_the_model_so_the_pool_agrees_on_it() -> None:
    priced = {"INFERENCE_PRICE_INPUT": "0.6", "INFERENCE_PRICE_OUTPUT": "3"}
    s = Settings.from_env(POOL | priced)
    assert [a.price for a in s.attachments] == [Price(0.6, 3.0), Price(0.6, 3.0)]
    assert s.price_for("kimi-k2-5") == Price(0.6, 3.0)
    other = {"INFERENCE_2_PRICE_INPUT": "1", "INFERENCE_2_PRICE_OUTPUT": "3"}
    with pytest.raises(
        ConfigError, match="INFERENCE_2_PRICE_INPUT/_OUTPUT differ from INFERENCE's"
    ):
        Settings.from_env(POOL | priced | other)
    with pytest.raises(ConfigError, match="DAILY_BUDGET_USD needs the price of kimi-k2-5"):
        Settings.from_env(POOL | {"DAILY_BUDGET_USD": "5"})


def test_a_request_may_name_only_a_served_model() -> None:
    limits = request_limits(Settings.from_env(POOL))
    assert limits.known_models == {"kimi-k2-5"}
    with pytest.raises(ValidationError, match=re.escape("(served: kimi-k2-5)")):
        check_request({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}, limits)


def test_pool_variables_read_back_as_the_same_attachments() -> None:
    priced = {"INFERENCE_PRICE_INPUT": "0.6", "INFERENCE_PRICE_OUTPUT": "3"}
    s = Settings.from_env(POOL | priced | {"INFERENCE_2_RPM": "200", "INFERENCE_2_HEADROOM": "0.1"})
    first = {k: v for k, v in POOL.items() if k.startswith(("INFERENCE_URL", "INFERENCE_KEY"))}
    again = Settings.from_env(first | priced | pool_variables(s.attachments))

    def bare(s: Settings) -> list[Attachment]:
        return [dataclasses.replace(a, limits_from_env=()) for a in s.attachments]

    assert bare(again) == bare(s) and len(again.attachments) == 2
    assert pool_variables(Settings.from_env({}).attachments) == {}
