"""kombu's Redis transport, with a crash on reconnection worked around and one
synchronous Redis client per connection pool (see :meth:`Channel._create_client`).

When a worker's consumer loses Redis, Celery collects the broken connection
(which drops the transport's link to its ``Connection``) and then closes it.
Closing the channel makes kombu's Redis QoS give its unacknowledged messages
back, through a client it can no longer build: ``AttributeError: 'NoneType'
object has no attribute 'hostname'``. That error is neither a connection nor a
channel error, so it escapes Celery's reconnection as an "Unrecoverable error"
and stops the consumer for good (celery/celery#10205 and #10302 report the same
symptom). Acknowledging a task that finishes after the loss fails the same way.

Here both are logged and skipped. Nothing is lost by it: a message that was not
given back or acknowledged stays in kombu's unacked hash and returns after the
visibility timeout, the dispatcher republishes jobs whose message went missing,
and a duplicate message is harmless (the claim in Postgres ignores it).

Celery uses this transport through ``broker_transport`` (see
:func:`jobs.connections.celery_config`), under the names ``bi-redis`` and
``bi-rediss`` (the latter for TLS URLs) so that Celery's "Connected to" line still
says which; URLs stay plain ``redis://``/``rediss://``.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)

#: Where kombu finds the transport.
TRANSPORT = "jobs.broker:Transport"
#: Celery's ``broker_transport`` for plain and TLS URLs: names kombu resolves to
#: :data:`TRANSPORT`, and that Celery prints as the URL's scheme.
PLAIN, TLS = "bi-redis", "bi-rediss"
TRANSPORT_ALIASES.setdefault(PLAIN, TRANSPORT)
TRANSPORT_ALIASES.setdefault(TLS, TRANSPORT)


def transport_for(url: str) -> str:
    """The ``broker_transport`` value for a ``redis://`` or ``rediss://`` URL."""
    return TLS if url.startswith("rediss://") else PLAIN


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            delivered = self._delivered
            logger.warning(
                "event=broker_restore_skipped messages=%d error=%s",
                len(delivered or ()),
                type(exc).__name__,
            )
            if delivered is not None:
                delivered.clear()

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            logger.warning("event=broker_ack_skipped error=%s", type(exc).__name__)
            # Forget it in memory all the same (the in-memory half of kombu's ack):
            # it is no longer this channel's to give back.
            super(kombu_redis.QoS, self).ack(delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    #: The synchronous client of :meth:`_create_client`, reused while its pool lives.
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new ``redis.Redis`` for every ack and every delivery.

        With redis-py 8, building one costs more CPU than the command it then
        sends (a profile of a worker at full speed put 5 % of its time there).
        A client is thread-safe and holds no connection of its own, so one is
        kept per pool; a reconnection replaces the pool, and with it the client.
        """
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()  # type: ignore[misc]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
