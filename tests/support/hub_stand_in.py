"""A stand-in for the Hugging Face hub's file endpoints and for a release download server, on 127.0.0.1.

huggingface_hub honours HF_ENDPOINT, so the set-up talks to this instead of the hub. HEAD and GET of
/<repository>/resolve/main/<path> answer as the hub does for an LFS file: X-Repo-Commit, the sha256 in
X-Linked-Etag and ETag, the size in X-Linked-Size and Content-Length, and Range requests (206). Other paths
serve plain files, as a release server does (the insightface zip). Faults on demand: drop the connection
after some bytes of the first GET, stall after some bytes (for Ctrl-C mid-download), announce a hash or a
size other than the content's. Every request is recorded, so a test can tell what was downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import re
import socket
import threading
from dataclasses import dataclass

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    content: bytes
    hub: bool  # answer with the hub's LFS headers
    announced_sha256: str | None = None  # default: the content's
    announced_size: int | None = None  # default: the content's
    drop_after: int | None = None  # the first GET stops after this many bytes, mid-file
    dropped: bool = False
    stall_after: int | None = None  # every GET sends this many bytes, then nothing more until the stand-in stops


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class HubStandIn:
    def __init__(self):
        self.stopping = threading.Event()
        self.files: dict[str, Served] = {}
        self.requests: list[Request] = []
        self.url = ""

    def add_hub_file(self, repository: str, path: str, content: bytes, **faults) -> None:
        self.files[f"/{repository}/resolve/main/{path}"] = Served(content, hub=True, **faults)

    def add_file(self, path: str, content: bytes, **faults) -> str:
        self.files[path] = Served(content, hub=False, **faults)
        return self.url + path

    def gets(self) -> list[Request]:
        return [request for request in self.requests if request.method == "GET"]


def _handler(stand_in: HubStandIn):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, with_body: bool) -> None:
            stand_in.requests.append(Request(self.command, self.path, self.headers.get("Range")))
            served = stand_in.files.get(self.path)
            if served is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            content = served.content
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match:
                start = int(match.group(1))
                if start >= len(content):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(content)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if match else 200)
            if served.hub:
                sha256 = served.announced_sha256 or hashlib.sha256(content).hexdigest()
                size = served.announced_size if served.announced_size is not None else len(content)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("ETag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            if match:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            if not with_body:
                return
            body = content[start:]
            if served.drop_after is not None and not served.dropped:
                served.dropped = True
                self.wfile.write(body[:served.drop_after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection breaks mid-file
                self.close_connection = True
                return
            if served.stall_after is not None:
                self.wfile.write(body[:served.stall_after])
                self.wfile.flush()
                stand_in.stopping.wait()
                return
            self.wfile.write(body)

        def do_HEAD(self):
            self._answer(with_body=False)

        def do_GET(self):
            self._answer(with_body=True)

    return Handler


@contextlib.contextmanager
def running() -> HubStandIn:
    stand_in = HubStandIn()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    server.daemon_threads = True
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        stand_in.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
