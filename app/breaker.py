"""The API's circuit breaker in front of Redis.

Handlers call Redis inline on the event loop, so with a Redis that hangs (frozen, partitioned)
every request would block the whole loop for a socket timeout in turn: 20 waiting status reads =
/healthz stalled for 60 s. After a Redis timeout (app/handlers.py redis_down_handler calls trip())
connections are refused at once, so requests get their 503 without touching Redis, and a
background PING closes the breaker again.
"""
from __future__ import annotations

import logging
import threading
import time

import redis as redis_lib

log = logging.getLogger("latentd.api")


class BreakerPool(redis_lib.ConnectionPool):
    """A connection pool that refuses connections while the breaker is open (`tripped`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tripped = False
        self._probing = threading.Lock()

    def trip(self) -> None:
        self.tripped = True
        if self._probing.acquire(blocking=False):
            threading.Thread(target=self._probe, name="redis-breaker", daemon=True).start()

    def _probe(self) -> None:
        try:
            while self.tripped:
                conn = self.connection_class(**self.connection_kwargs)
                try:
                    conn.send_command("PING")
                    if conn.read_response() in (b"PONG", "PONG"):
                        self.tripped = False
                except (redis_lib.RedisError, OSError):
                    time.sleep(0.25)
                finally:
                    conn.disconnect()
        except Exception:  # noqa: BLE001 - never leave the breaker stuck open
            log.exception("redis breaker probe failed; closing the breaker")
            self.tripped = False
        finally:
            self._probing.release()

    def get_connection(self, *args, **kwargs):
        if self.tripped:
            raise redis_lib.ConnectionError("Redis marked unavailable (circuit breaker open)")
        return super().get_connection(*args, **kwargs)
