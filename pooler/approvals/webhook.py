"""``approval_webhook = URL``: each new, decided or expired request POSTed as JSON, from a thread
of its own, with bounded retries.

Rules this module keeps:
- The event loop only puts an event on a bounded queue (``changed``); a full queue drops the
  event with a log line. A webhook that is down or slow never delays or loses a request: the
  request lives in the approvals book, the webhook only tells about it.
- Each event is tried ``RETRIES`` times with a doubling pause; a 2xx answer is success.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.error
import urllib.request

import orjson

log = logging.getLogger("pooler.approvals")

RETRIES = 4
FIRST_PAUSE = 0.5
TIMEOUT = 5.0
_TOLD = ("new", "approved", "denied", "expired", "withdrawn", "granted", "revoked")


class Webhook:
    def __init__(self, url: str) -> None:
        self.url = url
        self.q: queue.Queue = queue.Queue(maxsize=1000)
        self.sent = self.failed = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="approval-webhook", daemon=True)
        self._thread.start()

    def changed(self, kind: str, what) -> None:
        if kind not in _TOLD:
            return
        body = {"event": kind, "at": time.time(),
                ("grant" if kind in ("granted", "revoked") else "request"): what.as_dict(time.time())}
        try:
            self.q.put_nowait(orjson.dumps(body))
        except queue.Full:
            self.dropped += 1
            log.warning("approval webhook queue full: %s event dropped", kind)

    def _run(self) -> None:
        while True:
            body = self.q.get()
            if body is None:
                return
            pause = FIRST_PAUSE
            for attempt in range(1, RETRIES + 1):
                try:
                    req = urllib.request.Request(self.url, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                        if 200 <= resp.status < 300:
                            self.sent += 1
                            break
                except (urllib.error.URLError, OSError, ValueError) as e:
                    why = str(e)
                else:
                    why = f"HTTP {resp.status}"
                if attempt == RETRIES:
                    self.failed += 1
                    log.warning("approval webhook %s failed %d times (%s): event not delivered", self.url,
                                RETRIES, why)
                else:
                    time.sleep(pause)
                    pause *= 2

    def stop(self) -> None:
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
