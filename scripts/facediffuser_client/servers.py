"""The batch's executor for ComfyUI servers a user runs (--server): each run goes to the server with the shortest
queue, is followed there by its prompt id, and is taken back or cancelled when a server that stopped answering
answers again."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field

from .api_workflow import fill_run
from .http_api import ComfyClient, RunError, ServerUnreachable, WorkflowRejected
from .jobs import Job
from .manifest import DONE, PENDING, RUNNING
from .scheduler import backoff, interrupts_held


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
    resume_note = "runs still on a server are picked up there"

    def __init__(self, scheduler, urls: list[str]):
        self.scheduler = scheduler
        self.args = scheduler.args
        self.client_id = uuid.uuid4().hex
        self.servers = {url.rstrip("/"): Server(url.rstrip("/"), ComfyClient(url)) for url in urls}
        self.running_since: dict[tuple[str, str], float] = {}  # first seen running on its server, in this invocation

    def describe(self) -> str:
        return "servers: " + ", ".join(self.servers)

    def close(self) -> None:
        pass

    def ended(self, server: Server, job_id: str, key: str) -> None:
        server.in_flight.discard((job_id, key))
        self.running_since.pop((job_id, key), None)

    def retry(self, server: Server, job_id: str, key: str, message: str, **fields) -> None:
        self.ended(server, job_id, key)
        server.retries += 1
        self.scheduler.retry(job_id, key, server.url, message, **fields)

    # -- servers --

    def server_down(self, server: Server, why: str) -> None:
        now = time.monotonic()
        if server.up:
            server.down_since = now
            self.scheduler.say(f"server  {server.url} stopped answering ({why})")
        server.failures += 1
        server.retry_at = now + backoff(server.failures)
        server.settled = False
        for job_id, key in sorted(server.in_flight):
            # A server that only missed a timeout still runs it: remembered, to be cancelled or taken back there.
            run = self.scheduler.manifest.run(job_id, key)
            self.retry(server, job_id, key, f"the server stopped answering ({why})",
                       abandoned=[*run.get("abandoned", []), [server.url, run["prompt_id"]]])

    def server_up(self, server: Server) -> None:
        if not server.up:
            self.scheduler.say(f"server  {server.url} answers again")
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
        manifest, changed = self.scheduler.manifest, False
        for job_id, key, run in list(self.scheduler.runs()):
            for left in [left for left in run.get("abandoned", []) if left[0] == server.url]:
                prompt_id = left[1]
                try:
                    finished = prompt_id not in queued and prompt_id in server.client.get_json(f"/history/{prompt_id}")
                except ServerUnreachable as error:
                    self.server_down(server, error.reason)
                    return
                run["abandoned"].remove(left)
                changed = True
                if run["state"] == PENDING and (prompt_id in queued or finished):
                    manifest.move(job_id, key, RUNNING, save=False, server=server.url, prompt_id=prompt_id)
                    server.in_flight.add((job_id, key))
                    self.scheduler.not_before.pop((job_id, key), None)
                    self.scheduler.say(f"attach  {job_id} {key}: prompt {prompt_id} on {server.url}, which answers again")
                elif prompt_id in queued:
                    with contextlib.suppress(RunError):
                        server.client.cancel(prompt_id)
                    self.scheduler.say(f"cancel  {job_id} {key}: prompt {prompt_id} on {server.url}, run elsewhere meanwhile")
            if not run.get("abandoned", True):
                del run["abandoned"]
        server.settled = True
        if changed:
            manifest.save()

    def unreachable_for(self) -> float:
        """How long no server has answered (0 while one does)."""
        downs = [s.down_since for s in self.servers.values()]
        return 0.0 if any(d is None for d in downs) else time.monotonic() - max(downs)

    # -- dispatching --

    def choose_server(self, job_id: str, key: str) -> Server | None:
        now = time.monotonic()
        for server in self.servers.values():
            if len(server.in_flight) < self.args.max_in_flight and (server.up or now >= server.retry_at) \
                    and now - server.queue_read > self.args.poll:
                self.read_queue(server)
        free = [s for s in self.servers.values() if s.up and len(s.in_flight) < self.args.max_in_flight]
        if not free:
            return None
        others = [s for s in free if s.url != self.scheduler.avoid.get((job_id, key))]
        return min(others or free, key=lambda s: (s.queue_length, len(s.in_flight), s.url))

    def upload(self, server: Server, job: Job) -> list[str]:
        names = []
        for face, digest in zip(job.faces, job.face_hashes):
            if digest not in server.uploads:
                server.uploads[digest] = server.client.upload_image(face)
                self.scheduler.say(f"upload  {face} to {server.url} as {server.uploads[digest]}")
            names.append(server.uploads[digest])
        return names

    def submit(self, job_id: str, key: str, server: Server) -> None:
        job = self.scheduler.jobs[job_id]
        run = self.scheduler.manifest.run(job_id, key)
        try:
            workflow = fill_run(job.workflow, job.loaders, self.upload(server, job), run["seed"], server.client,
                                report=lambda text: self.scheduler.note_once(f"{server.url}: {text}"))
            with interrupts_held():
                prompt_id = server.client.submit(workflow, self.client_id)
                server.in_flight.add((job_id, key))
                server.queue_length += 1
                self.scheduler.started(job_id, key, server.url, prompt_id)
        except ServerUnreachable as error:
            self.server_down(server, error.reason)
            return  # nothing ran: the run stays pending, for the next free server
        except WorkflowRejected as error:
            self.scheduler.fail(job_id, key, str(error))
            return
        except RunError as error:
            self.retry(server, job_id, key, str(error))
            return

    def dispatch(self) -> bool:
        submitted = False
        for job_id, key in list(self.scheduler.ready_runs()):
            server = self.choose_server(job_id, key)
            if server is None:
                break
            if self.scheduler.manifest.run(job_id, key)["state"] != PENDING:
                continue  # taken back by a server that answered again while choose_server read its queue
            self.submit(job_id, key, server)
            submitted = True
        return submitted

    # -- following the runs on their servers --

    def adopt_running(self) -> None:
        """Runs a previous invocation left running: re-attached where their server is still in the list."""
        for job_id, key, run in list(self.scheduler.runs(RUNNING)):
            server = self.servers.get(run.get("server") or "")
            if server is None:
                self.scheduler.requeue(job_id, key, f"its server {run.get('server')} is not among --server")
            else:
                server.in_flight.add((job_id, key))
                self.scheduler.say(f"attach  {job_id} {key}: prompt {run['prompt_id']} on {server.url}")

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
        prompt_id = self.scheduler.manifest.run(job_id, key)["prompt_id"]
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
                state = self.scheduler.finish(job_id, key, server.url, entry, server.client.download)
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
        if time.monotonic() - self.running_since.get((job_id, key), float("inf")) > self.args.job_timeout:
            with contextlib.suppress(RunError):  # gone or refusing: either way the run is tried again
                server.client.cancel(prompt_id)
            self.retry(server, job_id, key, f"no result within --job-timeout {self.args.job_timeout:g} s")
            return True
        return False

    # -- reports --

    def in_flight(self) -> str:
        return ", ".join(f"{s.url} {len(s.in_flight)}{'' if s.up else ' (down)'}" for s in self.servers.values())

    def summary_lines(self) -> list[str]:
        return [f"{server.url}: {server.runs_done} run(s) done here, {server.retries} retried elsewhere, "
                f"{len(server.uploads)} photo(s) uploaded" for server in self.servers.values()]
