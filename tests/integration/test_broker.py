"""The broker transport: closing a consumer's collected connection must not crash it,
and kombu's synchronous Redis client is built once per pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kombu import Connection, Exchange, Message, Queue

from jobs import broker
from jobs.connections import redis_client

pytestmark = pytest.mark.integration

QUEUE = Queue("bi-test-broker", Exchange("bi-test-broker"), routing_key="bi-test-broker")


def take_one(conn: Connection) -> Message:
    """Publish one message and take it without acknowledging it, as an acks_late task."""
    channel = conn.default_channel
    conn.Producer(channel).publish(
        {"n": 1}, exchange=QUEUE.exchange, routing_key="bi-test-broker", declare=[QUEUE]
    )
    message = QUEUE(channel).get(no_ack=False)
    assert message is not None
    return message


def collect(conn: Connection) -> None:
    """What Celery's consumer leaves behind after a connection error: the channel's
    pools dropped and the transport cut from its Connection."""
    conn.default_channel._disconnect_pools()
    conn.transport.client = None


@pytest.fixture
def unacked(redis_url: str) -> Iterator[str]:
    """The name of kombu's unacked hash on the test database, emptied afterwards."""
    client = redis_client(redis_url)
    yield "unacked"
    client.delete("unacked", "unacked_index", "bi-test-broker")
    client.close()


def test_stock_kombu_still_crashes_there(redis_url: str, unacked: str) -> None:
    # The day this fails, kombu is fixed and jobs/broker.py can go.
    conn = Connection(redis_url, transport="redis")
    take_one(conn)
    collect(conn)
    with pytest.raises(AttributeError, match="hostname"):
        conn.default_channel.close()


def test_closing_a_collected_connection_keeps_the_message_for_redelivery(
    redis_url: str, unacked: str
) -> None:
    conn = Connection(redis_url, transport=broker.PLAIN)
    message = take_one(conn)
    collect(conn)
    conn.default_channel.close()  # no AttributeError
    message.ack()  # a task finishing after the loss: skipped, not raised
    # Not given back and not acknowledged: kombu's visibility timeout returns it.
    assert redis_client(redis_url).hlen(unacked) == 1


def test_the_transport_works_as_kombus_on_a_live_connection(redis_url: str, unacked: str) -> None:
    with Connection(redis_url, transport=broker.PLAIN) as conn:
        take_one(conn).ack()
        assert redis_client(redis_url).hlen(unacked) == 0
        take_one(conn)
        conn.default_channel.close()  # a clean close gives the message back
    assert redis_client(redis_url).llen("bi-test-broker") == 1


def test_one_synchronous_client_per_pool_and_a_new_one_after_a_reconnection(
    redis_url: str, unacked: str
) -> None:
    with Connection(redis_url, transport=broker.PLAIN) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        # The event loop's client stays kombu's own: a different pool.
        assert channel._create_client(asynchronous=True) is not first
        channel._disconnect_pools()
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        # The rebuilt client works: a message goes through and is acknowledged.
        take_one(conn).ack()
        assert redis_client(redis_url).hlen(unacked) == 0
