"""The batch's executor for ComfyUI servers a user runs (--server): each run goes to the server with the shortest
queue, is followed there by its prompt id, and is taken back or cancelled when a server that stopped answering
answers again."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field

from .api_workflow import fill_run
from .executor import ExecutorSettings, Ledger, RunOrder, backoff, interrupts_held
from .http_api import ComfyClient, RunError, ServerUnreachable, WorkflowRejected
from .manifest import DONE, PENDING, RUNNING


@dataclass
class Server:
    url: str
    client: ComfyClient
    in_flight: set = field(default_factory=set)  # (job id, run key)
    queue_length: int = 0
    queue_read: float = float("-inf")
    down_since: float | None = None
    retry_at: float = 0.0
    failures: int = 0  # in a row
    uploads: dict = field(default_factory=dict)  # photo sha256 -> its name in the server's input folder
    runs_done: int = 0
    retries: int = 0
    settled: bool = False  # the runs abandoned on it were cancelled there or taken back since it last answered

    @property
    def up(self) -> bool:
        return self.down_since is None


class ServerExecutor:
    """The executor for ComfyUI servers a user runs (executor.Executor)."""

    resume_note = "runs still on a server are picked up there"
    unusable = "no server has answered"

    def __init__(self, ledger: Ledger, settings: ExecutorSettings, urls: list[str]):
        self.ledger = ledger
        self.settings = settings
        self.client_id = uuid.uuid4().hex
        self.servers = {url.rstrip("/"): Server(url.rstrip("/"), ComfyClient(url)) for url in urls}
        self.running_since: dict[tuple[str, str], float] = {}  # first seen running on its server, in this invocation
        self.abandoned: dict[str, list[tuple[str, str, str]]] = {}  # server -> (job id, run key, prompt id) left there

    def describe(self) -> str:
        return "servers: " + ", ".join(self.servers)

    def close(self) -> None:
        pass

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def stuck(self) -> str | None:
        return None  # servers that stopped answering may answer again: unusable_for() tells how long none has

    def ended(self, server: Server, job_id: str, key: str) -> None:
        server.in_flight.discard((job_id, key))
        self.running_since.pop((job_id, key), None)

    def retry(self, server: Server, job_id: str, key: str, message: str, **fields) -> None:
        self.ended(server, job_id, key)
        server.retries += 1
        self.ledger.retry(job_id, key, server.url, message, **fields)

    # -- servers --

    def server_down(self, server: Server, why: str) -> None:
        now = time.monotonic()
        if server.up:
            server.down_since = now
            self.ledger.say(f"server  {server.url} stopped answering ({why})")
        server.failures += 1
        server.retry_at = now + backoff(server.failures)
        server.settled = False
        for job_id, key in sorted(server.in_flight):
            # A server that only missed a timeout still runs it: remembered, to be cancelled or taken back there.
            run = self.ledger.record(job_id, key)
            self.abandoned.setdefault(server.url, []).append((job_id, key, run["prompt_id"]))
            self.retry(server, job_id, key, f"the server stopped answering ({why})",
                       abandoned=[*run.get("abandoned", []), [server.url, run["prompt_id"]]])

    def server_up(self, server: Server) -> None:
        if not server.up:
            self.ledger.say(f"server  {server.url} answers again")
        server.down_since, server.failures = None, 0

    def read_queue(self, server: Server) -> dict | None:
        try:
            queue = server.client.get_json("/queue")
        except ServerUnreachable as error:
            self.server_down(server, error.reason)
            return None
        self.server_up(server)
        server.queue_length = len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))
        server.queue_read = time.monotonic()
        if not server.settled:
            self.settle_abandoned(server, {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])})
        return queue

    def settle_abandoned(self, server: Server, queued: set) -> None:
        """The prompts left on `server` when it stopped answering (in this invocation or an earlier one): taken back
        where their run still waits for a server, cancelled where the run went elsewhere (no duplicate work)."""
        for job_id, key, prompt_id in list(self.abandoned.get(server.url, [])):
            try:
                finished = prompt_id not in queued and prompt_id in server.client.get_json(f"/history/{prompt_id}")
            except ServerUnreachable as error:
                self.server_down(server, error.reason)
                return
            self.abandoned[server.url].remove((job_id, key, prompt_id))
            run = self.ledger.record(job_id, key)
            self.ledger.annotate(job_id, key, abandoned=[left for left in run["abandoned"] if left != [server.url, prompt_id]] or None)
            if run["state"] == PENDING and (prompt_id in queued or finished):
                self.ledger.reattach(job_id, key, server.url, prompt_id)
                server.in_flight.add((job_id, key))
            elif prompt_id in queued:
                with contextlib.suppress(RunError):
                    server.client.cancel(prompt_id)
                self.ledger.say(f"cancel  {job_id} {key}: prompt {prompt_id} on {server.url}, run elsewhere meanwhile")
        server.settled = True

    def unusable_for(self) -> float:
        """How long no server has answered (0 while one does)."""
        downs = [s.down_since for s in self.servers.values()]
        return 0.0 if any(d is None for d in downs) else time.monotonic() - max(downs)

    # -- dispatching --

    def refresh_queues(self) -> None:
        """Read the queues of the servers with room (at most once per --poll), and try again those down whose
        back-off is over."""
        now = time.monotonic()
        for server in self.servers.values():
            if len(server.in_flight) < self.settings.max_in_flight and (server.up or now >= server.retry_at) \
                    and now - server.queue_read > self.settings.poll:
                self.read_queue(server)

    def free_slots(self) -> int:
        self.refresh_queues()
        return sum(self.settings.max_in_flight - len(s.in_flight) for s in self.servers.values()
                   if s.up and len(s.in_flight) < self.settings.max_in_flight)

    def choose_server(self, order: RunOrder) -> Server | None:
        self.refresh_queues()
        free = [s for s in self.servers.values() if s.up and len(s.in_flight) < self.settings.max_in_flight]
        if not free:
            return None
        others = [s for s in free if s.url != order.avoid]
        return min(others or free, key=lambda s: (s.queue_length, len(s.in_flight), s.url))

    def upload(self, server: Server, order: RunOrder) -> list[str]:
        names = []
        for face in order.faces:
            if face.digest not in server.uploads:
                server.uploads[face.digest] = server.client.upload_image(face.path)
                self.ledger.say(f"upload  {face.path} to {server.url} as {server.uploads[face.digest]}")
            names.append(server.uploads[face.digest])
        return names

    def submit(self, order: RunOrder) -> bool:
        server = self.choose_server(order)
        if server is None:
            return False
        job_id, key = order.job_id, order.key
        try:
            workflow = fill_run(order.workflow, order.loaders, self.upload(server, order), order.seed, server.client,
                                report=lambda text: self.ledger.note_once(f"{server.url}: {text}"))
            with interrupts_held():
                prompt_id = server.client.submit(workflow, self.client_id)
                server.in_flight.add((job_id, key))
                server.queue_length += 1
                self.ledger.started(job_id, key, server.url, prompt_id)
        except ServerUnreachable as error:
            self.server_down(server, error.reason)  # nothing ran: the run stays pending, for the next free server
        except WorkflowRejected as error:
            self.ledger.started(job_id, key, server.url, None)
            self.ledger.fail(job_id, key, str(error))
        except RunError as error:
            self.ledger.started(job_id, key, server.url, None)
            self.retry(server, job_id, key, str(error))
        return True

    # -- following the runs on their servers --

    def adopt_running(self) -> None:
        """Runs a previous invocation left running: re-attached where their server is still in the list. Prompts it
        left on servers that stopped answering are settled when those answer (settle_abandoned)."""
        for job_id, key in self.ledger.runs_in(RUNNING):
            run = self.ledger.record(job_id, key)
            server = self.servers.get(run.get("server") or "")
            if server is None:
                self.ledger.requeue(job_id, key, f"its server {run.get('server')} is not among --server")
            else:
                server.in_flight.add((job_id, key))
                self.ledger.say(f"attach  {job_id} {key}: prompt {run['prompt_id']} on {server.url}")
        for job_id, key in self.ledger.runs_with("abandoned"):
            for url, prompt_id in self.ledger.record(job_id, key)["abandoned"]:
                self.abandoned.setdefault(url, []).append((job_id, key, prompt_id))

    def poll(self) -> bool:
        """Check every run in flight; True when one ended."""
        ended = False
        for server in self.servers.values():
            if not server.in_flight or not server.up and time.monotonic() < server.retry_at:
                continue
            queue = self.read_queue(server)  # read before /history: a prompt leaves the queue only once its history exists
            if queue is None:
                continue
            running = {item[1] for item in queue.get("queue_running", [])}
            waiting = running | {item[1] for item in queue.get("queue_pending", [])}
            for job_id, key in sorted(server.in_flight):
                if (job_id, key) in server.in_flight:  # not requeued by a failure of the server earlier in this loop
                    ended |= self.check_run(server, job_id, key, waiting, running)
        return ended

    def check_run(self, server: Server, job_id: str, key: str, waiting: set, running: set) -> bool:
        prompt_id = self.ledger.record(job_id, key)["prompt_id"]
        if prompt_id in running:
            self.running_since.setdefault((job_id, key), time.monotonic())
        try:
            entry = server.client.get_json(f"/history/{prompt_id}").get(prompt_id)
        except ServerUnreachable as error:
            self.server_down(server, error.reason)
            return True
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            self.ended(server, job_id, key)
            try:
                state = self.ledger.finished(job_id, key, server.url, entry, server.client.download)
            except ServerUnreachable as error:
                server.in_flight.add((job_id, key))  # its pictures are still there: retried with the server's other runs
                self.server_down(server, error.reason)
                return True
            server.runs_done += state == DONE
            server.retries += state == PENDING
            return True
        if prompt_id not in waiting and entry is None:
            self.retry(server, job_id, key, f"prompt {prompt_id} is gone from the server (it restarted?)")
            return True
        # From its start: time queued behind other users' prompts, or while this client was stopped, is no sign of a hang.
        if time.monotonic() - self.running_since.get((job_id, key), float("inf")) > self.settings.job_timeout:
            with contextlib.suppress(RunError):  # gone or refusing: either way the run is tried again
                server.client.cancel(prompt_id)
            self.retry(server, job_id, key, f"no result within --job-timeout {self.settings.job_timeout:g} s")
            return True
        return False

    # -- reports --

    def in_flight(self) -> str:
        return ", ".join(f"{s.url} {len(s.in_flight)}{'' if s.up else ' (down)'}" for s in self.servers.values())

    def summary_lines(self) -> list[str]:
        return [f"{server.url}: {server.runs_done} run(s) done here, {server.retries} retried elsewhere, "
                f"{len(server.uploads)} photo(s) uploaded" for server in self.servers.values()]
