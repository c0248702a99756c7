"""What the pack's nodes write to ComfyUI's log while a job runs, shown where the runner runs.

ComfyUI's frontend shows the server's log in its terminal panel this way: it subscribes its client id (PATCH
/internal/logs/subscribe {"clientId", "enabled"}), and from then on the server sends each batch of text written to
its stdout and stderr as a "logs" message ({"entries": [{"t", "m"}, ...]}) on that client's websocket (ComfyUI 0.17
and 0.33: app/logger.py, api_server/services/terminal_service.py). The runner subscribes the websocket that brings
its progress, and keeps a log record (one entry: Python's logging writes a record, continuation lines included, in
one write) when

- a job of its client id runs: from that job's "execution_start" to its end ("execution_success", "execution_error",
  "execution_interrupted"), messages that come on the same websocket in the order the server sent them, so a
  record belongs to the job during which it was written;
- a Face-diffuser node wrote it: its text starts with "Face-diffuser" (every message the pack logs starts with the
  node's name), after the level tag that ComfyUI 0.33 and newer put first ("[WARNING] ") and colour codes.

The records are shown at the log level the server runs with (INFO by default, so the faces found and the regions
decided as well as the warnings), with the level tag where the server writes one.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.error
import urllib.request

from .http_api import REQUEST_TIMEOUT_S
from .progress import CONNECT_TIMEOUT_S, ProgressListener

PACK_PREFIX = "Face-diffuser"
JOB_ENDS = ("execution_success", "execution_error", "execution_interrupted")
COLOUR_CODE = re.compile(r"\x1b\[[0-9;]*m")
LEVEL_TAG = re.compile(r"^\[[A-Z]+\] ")
LOG_GRACE_S = 5.0  # how long the runner waits, once the history says the job ended, for its last messages
SHOWN_AS = "ComfyUI log: "


def pack_record(text: str) -> str | None:
    """One entry of the server's log, without colour codes, when a Face-diffuser node wrote it; else None."""
    plain = COLOUR_CODE.sub("", text).rstrip("\n")
    return plain if LEVEL_TAG.sub("", plain, count=1).startswith(PACK_PREFIX) else None


class JobLog(ProgressListener):
    """The progress listener, subscribed to the server's log: the pack's records of each job of its client id.
    `unavailable` says why no record can come (None when they can)."""

    def __init__(self, server: str, client_id: str):
        self._records: dict[str, list[str]] = {}
        self._running: str | None = None
        self._ended: set[str] = set()
        self._greeted = self._gone = False
        self._change = threading.Condition()
        super().__init__(server, client_id)
        self.unavailable = self._subscribe(server, client_id)

    def _subscribe(self, server: str, client_id: str) -> str | None:
        if self._sock is None:
            self._gone = True
            return "its websocket could not be opened"
        # The server greets a websocket (a "status" message) once it has registered it; a subscription before that
        # would be dropped at the first line the server writes.
        with self._change:
            self._change.wait_for(lambda: self._greeted or self._gone, CONNECT_TIMEOUT_S)
        request = urllib.request.Request(f"{server.rstrip('/')}/internal/logs/subscribe", method="PATCH",
                                         data=json.dumps({"clientId": client_id, "enabled": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S):
                return None
        except urllib.error.HTTPError as error:
            return f"the server answered HTTP {error.code} to the log subscription"
        except (OSError, http.client.HTTPException) as error:
            return f"the log subscription failed ({error})"

    def handle(self, message: dict) -> None:
        super().handle(message)
        kind, data = message.get("type"), message.get("data") or {}
        with self._change:
            if kind == "status":
                self._greeted = True
            elif kind == "execution_start":
                self._running = data.get("prompt_id")
            elif kind in JOB_ENDS:
                self._ended.add(data.get("prompt_id"))
                if self._running == data.get("prompt_id"):
                    self._running = None
            elif kind == "logs" and self._running is not None:
                records = [record for entry in data.get("entries") or [] if (record := pack_record(str(entry.get("m", ""))))]
                self._records.setdefault(self._running, []).extend(records)
            self._change.notify_all()

    def closed(self) -> None:
        with self._change:
            self._gone = True
            self._change.notify_all()

    def take(self, prompt_id: str) -> list[str]:
        """The job's records not taken before."""
        with self._change:
            return self._records.pop(prompt_id, [])

    def wait_for_end(self, prompt_id: str, timeout_s: float = LOG_GRACE_S) -> None:
        """Until the job's end has come on the websocket (the history can tell it first), the websocket is gone, or
        `timeout_s` passed."""
        with self._change:
            self._change.wait_for(lambda: prompt_id in self._ended or self._gone, timeout_s)


def show(records: list[str], state) -> None:
    """Each record as lines of the runner's output (`state`: the progress display's line writer)."""
    for record in records:
        first, *more = record.splitlines() or [""]
        state(SHOWN_AS + first)
        for line in more:
            state(" " * len(SHOWN_AS) + line)
