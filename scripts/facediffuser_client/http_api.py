"""ComfyUI's HTTP API as the pack's client uses it, and the errors a run can end in."""

from __future__ import annotations

import contextlib
import http.client
import json
import mimetypes
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


DEFAULT_SERVER = "http://127.0.0.1:8188"

REQUEST_TIMEOUT_S = 30.0


class RunError(Exception):
    """A failure the user can act on; its message is printed as is and the runner exits with status 1."""


class ServerUnreachable(RunError):
    """No answer from the server (refused, reset, timed out): it may come back, or another server can do the job."""

    def __init__(self, server: str, reason):
        address = urllib.parse.urlsplit(server)
        port = address.port or (443 if address.scheme == "https" else 80)
        super().__init__(f"no ComfyUI server answers at {server} ({reason}): start it with `python main.py --listen "
                         f"{address.hostname or '127.0.0.1'} --port {port}` in your ComfyUI folder, or point --server at the one you run")
        self.reason = str(reason)


class WorkflowRejected(RunError):
    """ComfyUI refused the workflow (/prompt answered 400, its validation errors): every server would."""


class RunTimedOut(RunError):
    """A job still unfinished after its time, on a server that still answers (and may hang on every later job)."""


class ComfyClient:
    """ComfyUI's HTTP API, as its own frontend uses it."""

    def __init__(self, server: str):
        self.server = server.rstrip("/")
        self.node_types: dict[str, dict] = {}  # /object_info of the node types asked about, read once

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.server + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise  # the server answered; callers read its error body
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as error:
            # HTTPException: the server went away in the middle of its answer
            raise ServerUnreachable(self.server, getattr(error, "reason", error)) from None

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def post_json(self, path: str, payload) -> bytes:
        return self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def upload_image(self, path: Path) -> str:
        """Put a photo into the server's input folder; return the name LoadImage must use there."""
        try:
            content = path.read_bytes()
        except OSError as error:
            raise RunError(f"--face: cannot read {path}: {error.strerror}") from None
        boundary = uuid.uuid4().hex
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            content,
            f"\r\n--{boundary}--\r\n".encode(),
        ])
        try:
            answer = json.loads(self._request(
                "/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        except urllib.error.HTTPError as error:
            raise RunError(f"--face: the server refused to store {path} (HTTP {error.code})") from None
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def submit(self, workflow: dict, client_id: str) -> str:
        body = json.dumps({"prompt": workflow, "client_id": client_id}).encode()
        try:
            answer = json.loads(self._request("/prompt", body, {"Content-Type": "application/json"}))
        except urllib.error.HTTPError as error:
            rejected = WorkflowRejected if error.code == 400 else RunError
            raise rejected(describe_rejection(error.read(), workflow)) from None
        if answer.get("node_errors"):
            # ComfyUI queued the outputs that passed validation and dropped the others: not the job that was asked for.
            self.cancel(answer["prompt_id"])
            raise WorkflowRejected(describe_validation(
                {"error": "some of its outputs failed validation, so it was not run", "node_errors": answer["node_errors"]}, workflow))
        return answer["prompt_id"]

    def cancel(self, prompt_id: str) -> None:
        """Take the job out of the queue, or stop it if it is running."""
        self.post_json("/queue", {"delete": [prompt_id]})
        self.post_json("/interrupt", {"prompt_id": prompt_id})

    def input_spec(self, class_type: str, input_name: str) -> list:
        """A required input of a node type as the server's /object_info describes it (read once per node type: a
        batch asks before every run)."""
        if class_type not in self.node_types:
            self.node_types[class_type] = self.get_json(f"/object_info/{class_type}").get(class_type, {})
        return self.node_types[class_type].get("input", {}).get("required", {}).get(input_name, [])

    def run_job(self, workflow: dict, client_id: str, timeout_s: float, on_submitted=None, **wait_options) -> tuple[str, dict]:
        """Submit `workflow` and wait for its end (wait_options: those of wait): its prompt id and history entry.
        `on_submitted(prompt_id)` is called as soon as the server has it. Interrupted here (Ctrl-C), the job is
        cancelled on the server, where it would otherwise hold the GPU for nobody."""
        prompt_id = self.submit(workflow, client_id)
        if on_submitted is not None:
            on_submitted(prompt_id)
        try:
            return prompt_id, self.wait(prompt_id, timeout_s, **wait_options)
        except KeyboardInterrupt:
            with contextlib.suppress(RunError, OSError):  # a server that went away has dropped it anyway
                self.cancel(prompt_id)
            raise

    def wait(self, prompt_id: str, timeout_s: float, poll_s: float = 0.5, report=print, tick=None,
             timeout_option: str = "--timeout", from_start: bool = False) -> dict:
        """Poll until the job leaves the queue; report its place in the queue when it changes, call `tick` at each poll.
        The time counts from now, or with `from_start` from the job's start (time queued behind other jobs is no
        sign of a hang); past it, RunTimedOut names `timeout_option`."""
        started = None if from_start else time.monotonic()
        last_state = None
        while True:
            if tick is not None:
                tick()  # first: the job's last steps are shown even when it ends between two polls
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            state = self._queue_state(prompt_id)
            if state != last_state:
                report(state)
                last_state = state
            if started is None and not state.startswith("queued"):
                started = time.monotonic()
            if started is not None and time.monotonic() - started > timeout_s:
                raise RunTimedOut(
                    f"gave up after {timeout_s:g} s: job {prompt_id} is still {state} on {self.server} "
                    f"(raise {timeout_option}, or cancel it in ComfyUI's queue)"
                )
            time.sleep(poll_s)

    def _queue_state(self, prompt_id: str) -> str:
        queue = self.get_json("/queue")
        if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
            return "running"
        pending = sorted(queue.get("queue_pending", []), key=lambda item: item[0])
        for position, item in enumerate(pending):
            if item[1] == prompt_id:
                return f"queued, {position} job(s) ahead"
        return "finishing"

    def download(self, image: dict) -> bytes:
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")})
        return self._request(f"/view?{query}")


def describe_rejection(body: bytes, workflow: dict) -> str:
    """ComfyUI's /prompt 400 answer, {error, node_errors}, as lines a person can act on."""
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        return f"ComfyUI rejected the workflow: {body.decode(errors='replace')}"
    return describe_validation(answer, workflow)


def describe_validation(answer: dict, workflow: dict) -> str:
    error = answer.get("error", {})
    if isinstance(error, str):
        error = {"message": error}
    lines = [f"ComfyUI rejected the workflow: {error.get('message', 'no reason given')}"
             + (f" ({error['details']})" if error.get("details") else "")]
    for node_id, node_error in answer.get("node_errors", {}).items():
        class_type = node_error.get("class_type") or workflow.get(node_id, {}).get("class_type", "?")
        for item in node_error.get("errors", []):
            detail = f": {item['details']}" if item.get("details") else ""
            lines.append(f"  node {node_id} ({class_type}): {item.get('message', '')}{detail}")
    return "\n".join(lines)


def describe_failure(entry: dict) -> str:
    """The execution_error (or interruption) ComfyUI recorded in the job's history."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return (f"ComfyUI failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}")
        if event == "execution_interrupted":
            return f"the job was interrupted in ComfyUI at node {data.get('node_id')} ({data.get('node_type')})"
    return f"ComfyUI reports the job as {entry.get('status', {}).get('status_str', 'failed')} without a reason"


def comfyui_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=2) as response:
            return "system" in json.loads(response.read())
    except (OSError, ValueError):
        return False


def output_images(entry: dict) -> list[tuple[str, dict]]:
    """(node id, image reference) of every picture the job's nodes report in its history, in ComfyUI's order."""
    return [(node_id, image) for node_id, node_output in entry.get("outputs", {}).items() for image in node_output.get("images", [])]


def cached_nodes(entry: dict) -> set[str]:
    """The nodes whose results ComfyUI reused from an earlier run instead of running them (its "execution_cached"
    message); their pictures in the history are that earlier run's."""
    return {str(node) for event, data in entry.get("status", {}).get("messages", []) if event == "execution_cached"
            for node in data.get("nodes", [])}


TRANSIENT_EXCEPTIONS = ("OutOfMemory",)  # execution errors another server (another GPU) may not have


def transient_failure(entry: dict) -> bool:
    """Interrupted runs (a restarting server, a timed-out run cancelled) and out-of-memory errors may succeed
    elsewhere; any other error in a node (a photo without a face, a wrong input) fails everywhere."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_interrupted":
            return True
        if event == "execution_error":
            return any(kind in str(data.get("exception_type", "")) for kind in TRANSIENT_EXCEPTIONS)
    return False
