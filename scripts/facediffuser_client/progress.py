"""A job's step progress as ComfyUI's own frontend gets it: the "progress" messages of its websocket
(/ws?clientId=...), which reach the client id the job was submitted with. Read on a thread with the standard
library (a websocket client in a few lines: the server's frames are unmasked and small), and shown as a bar
on a terminal, as plain lines where the output is piped or logged, with the time elapsed and an estimate of the
time left. StatusLine, the line redrawn in place, also draws the set-up's download progress."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
import urllib.parse

CONNECT_TIMEOUT_S = 10.0
TEXT, CLOSE = 0x1, 0x8
BAR_WIDTH = 30
PLAIN_LINES = 10  # a piped run prints a line each tenth of a node's steps


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the websocket closed")
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[int, bytes]:
    """One whole message (fragments joined): its opcode and payload."""
    opcode, payload = None, b""
    while True:
        first, second = _read_exactly(sock, 2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", _read_exactly(sock, 2))
        elif length == 127:
            (length,) = struct.unpack(">Q", _read_exactly(sock, 8))
        mask = _read_exactly(sock, 4) if second & 0x80 else None
        data = _read_exactly(sock, length)
        if mask:
            data = bytes(byte ^ mask[index % 4] for index, byte in enumerate(data))
        if first & 0x0F:
            opcode = first & 0x0F
        payload += data
        if first & 0x80:  # the final fragment
            return opcode, payload


def connect(server: str, client_id: str) -> socket.socket:
    address = urllib.parse.urlsplit(server)
    if address.scheme != "http":
        raise OSError(f"progress is read over plain http only, not {address.scheme}")
    port = address.port or 80
    sock = socket.create_connection((address.hostname, port), timeout=CONNECT_TIMEOUT_S)
    key = base64.b64encode(os.urandom(16)).decode()
    path = f"{address.path.rstrip('/')}/ws?clientId={urllib.parse.quote(client_id)}"
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {address.hostname}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += _read_exactly(sock, 1)
    if b" 101 " not in answer.split(b"\r\n", 1)[0]:
        sock.close()
        raise OSError(f"the server did not open a websocket: {answer.splitlines()[0].decode(errors='replace')}")
    sock.settimeout(None)
    return sock


class ProgressListener:
    """The latest (step, steps, node id) of each job of one client id; nothing (and no error) when the server
    offers no websocket: the queue state is then all the runner shows."""

    def __init__(self, server: str, client_id: str):
        self._latest: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.Lock()
        try:
            self._sock = connect(server, client_id)
        except OSError:
            self._sock = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                opcode, payload = read_message(self._sock)
                if opcode == CLOSE:
                    return
                if opcode != TEXT:
                    continue  # previews are binary messages
                self.handle(json.loads(payload))
        except (OSError, ValueError, KeyError, TypeError):
            return  # the connection went away: progress stops, the job's end still comes from /history
        finally:
            self.closed()

    def handle(self, message: dict) -> None:
        """One text message of the websocket; a subclass reads more kinds."""
        data = message.get("data") or {}
        if message.get("type") == "progress" and "prompt_id" in data:
            with self._lock:
                self._latest[data["prompt_id"]] = (int(data["value"]), int(data["max"]), str(data.get("node")))

    def closed(self) -> None:
        """The websocket is gone (a subclass stops waiting for its messages)."""

    def progress(self, prompt_id: str) -> tuple[int, int, str] | None:
        with self._lock:
            return self._latest.get(prompt_id)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def clock_text(seconds: float) -> str:
    """A duration as a clock shows it: 0:07, 12:34, 1:02:03."""
    minutes, whole_seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{whole_seconds:02d}" if hours else f"{minutes}:{whole_seconds:02d}"


def time_left(seconds_so_far: float, done_so_far: float, remaining: float) -> float | None:
    """The time `remaining` units take at the pace of the `done_so_far` units that took `seconds_so_far`; None
    before any unit was timed."""
    return seconds_so_far / done_so_far * remaining if done_so_far > 0 else None


def timing_text(elapsed: float, left: float | None) -> str:
    return f"{clock_text(elapsed)} elapsed" + ("" if left is None else f", about {clock_text(left)} left")


class StatusLine:
    """One line redrawn in place on a terminal. A drawing covers the whole of the previous one: a shorter line
    after a longer one would otherwise leave the longer one's tail on screen."""

    def __init__(self, stream):
        self.stream = stream
        self.terminal = stream.isatty()
        self.width = 0  # of the line on screen; 0: none open

    def draw(self, text: str) -> None:
        self.stream.write(f"\r{text}{' ' * (self.width - len(text))}")
        self.stream.flush()
        self.width = max(len(text), 1)

    def end(self) -> None:
        """Leave the line as it is and go to the next one."""
        if self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


class ProgressDisplay:
    """Queue states and step progress: one bar redrawn in place on a terminal, plain lines otherwise; each with
    the time since the job began running and, from the pace of the node's steps so far, the time its steps left take."""

    def __init__(self, workflow: dict, stream, prefix: str = "  ", clock=time.monotonic):
        self.workflow = workflow
        self.stream = stream
        self.prefix = prefix
        self.clock = clock
        self.line = StatusLine(stream)
        self.terminal = self.line.terminal
        self.last: tuple[int, int, str] | None = None
        self.running_since: float | None = None
        self.node_pace_from: tuple[str, int, int, float] | None = None  # (node, steps, step, time) the pace counts from

    def state(self, text: str) -> None:
        if text == "running" and self.running_since is None:
            self.running_since = self.clock()
        self.line.end()
        self.stream.write(f"{self.prefix}{text}\n")
        self.stream.flush()

    def _timing(self, value: int, steps: int, node: str, previous: tuple[int, int, str] | None) -> str:
        now = self.clock()
        if self.running_since is None:
            self.running_since = now
        start = self.node_pace_from
        if start is None or start[:2] != (node, steps) or previous is None or value < previous[0]:
            self.node_pace_from = start = (node, steps, value, now)
        left = None if value >= steps else time_left(now - start[3], value - start[2], steps - value)
        return timing_text(now - self.running_since, left)

    def step(self, progress: tuple[int, int, str] | None) -> None:
        if progress is None or progress == self.last:
            return
        value, steps, node = progress
        previous = self.last
        self.last = progress
        timing = self._timing(value, steps, node, previous)
        what = f"node {node} ({self.workflow.get(node, {}).get('class_type', '?')})"
        if self.terminal:
            done = BAR_WIDTH * value // max(steps, 1)
            self.line.draw(f"{self.prefix}{what} [{'#' * done}{'.' * (BAR_WIDTH - done)}] {value}/{steps}, {timing}")
            return
        tenth = PLAIN_LINES * value // max(steps, 1)
        if previous is not None and previous[1:] == progress[1:] and PLAIN_LINES * previous[0] // max(steps, 1) == tenth:
            return
        self.stream.write(f"{self.prefix}{what}: step {value}/{steps}, {timing}\n")
        self.stream.flush()

    def close(self) -> None:
        self.line.end()
