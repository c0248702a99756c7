#!/usr/bin/env python3
"""Run a Face-diffuser workflow on a ComfyUI server from the command line and save the images it makes.

    python scripts/facediffuser_run.py --face me.jpg --prompt "a photo of a man <|image|> hiking in the alps"
    python scripts/facediffuser_run.py workflows/api/facediffuser_single_subject.json \\
        --face me.jpg --prompt "a photo of a man <|image|> hiking in the alps" --seed 7 --output out/

Without a workflow it runs the shipped single-subject workflow for one --face, the two-subject one for two.
Without --server it uses the ComfyUI answering at the default address, or, when none does, starts the
ComfyUI this pack is installed in (headless, on a free loopback port, with this Python), runs the job and
stops it again. The workflow must be in ComfyUI's API format (the copies in workflows/api/, or "Export (API)" in ComfyUI).
Overrides find their nodes by node type, never by node id, so they work on any workflow built from the
same nodes; an override whose node type is absent is an error. Reference photos are uploaded to the
server, so the server may run on another machine. Only the standard library is used: any Python 3.10+
that reaches the server can run this, without ComfyUI or torch.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import mimetypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_ROOT))
from facediffuser_core.model_folders import find_comfyui  # noqa: E402  (standard library only)

DEFAULT_SERVER = "http://127.0.0.1:8188"
REFERENCE_ENCODER = "FaceDiffuserEncodeReferenceFaces"
IMAGE_LOADER = "LoadImage"

# Where each override lands, as (node type, input name) pairs. Several pairs per override let one runner
# drive both the SNF-sampler workflows and the custom-sampling one (guider + RandomNoise + BasicScheduler).
OVERRIDE_TARGETS: dict[str, list[tuple[str, str]]] = {
    "prompt": [("FaceDiffuserSubjectPrompt", "text")],
    "seed": [("FaceDiffuserSNFSampler", "seed"), ("RandomNoise", "noise_seed"), ("FaceDiffuserStageSweep", "seed")],
    "steps": [("FaceDiffuserSNFSampler", "steps"), ("BasicScheduler", "steps"), ("FaceDiffuserStageSweep", "steps")],
    "cfg": [("FaceDiffuserSNFSampler", "cfg"), ("FaceDiffuserGuider", "cfg"), ("FaceDiffuserStageSweep", "cfg")],
    "alpha": [("FaceDiffuserSNFSampler", "alpha"), ("FaceDiffuserGuider", "alpha")],
    "beta": [("FaceDiffuserSNFSampler", "beta"), ("FaceDiffuserGuider", "beta")],
    "batch_size": [("EmptyLatentImage", "batch_size")],
}

REQUEST_TIMEOUT_S = 30.0


class RunError(Exception):
    """A failure the user can act on; its message is printed as is and the runner exits with status 1."""


class ServerUnreachable(RunError):
    """No answer from the server (refused, reset, timed out): it may come back, or another server can do the job."""

    def __init__(self, server: str, reason):
        super().__init__(f"no ComfyUI server answers at {server} ({reason}): start it with `python main.py --listen "
                         f"127.0.0.1 --port 8188` in your ComfyUI folder, or point --server at the one you run")
        self.reason = str(reason)


class WorkflowRejected(RunError):
    """ComfyUI refused the workflow (/prompt answered 400, its validation errors): every server would."""


def is_link(value) -> bool:
    """In the API format an input wired to another node is [source node id, output index]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def load_api_workflow(path: Path) -> dict:
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"workflow file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON: {error}") from None
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise RunError(
            f"{path} is a UI-format workflow (the kind ComfyUI's browser loads). The runner needs the API format: "
            f"use the copy in workflows/api/, or in ComfyUI use Workflow > Export (API)."
        )
    if not isinstance(workflow, dict) or not workflow or not all(
        isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict)
        for node in workflow.values()
    ):
        raise RunError(f"{path} is not an API-format workflow: expected {{node id: {{class_type, inputs}}}}")
    return workflow


def set_override(workflow: dict, option: str, value) -> list[str]:
    """Set `value` on every node that `option` targets; return the ids of the nodes changed."""
    targets = OVERRIDE_TARGETS[option]
    changed = []
    for node_id, node in workflow.items():
        for class_type, input_name in targets:
            if node["class_type"] != class_type:
                continue
            if input_name not in node["inputs"]:
                raise RunError(
                    f"--{option.replace('_', '-')}: node {node_id} ({class_type}) has no input '{input_name}': the workflow "
                    f"was made with another version of that node; re-export it from ComfyUI (Workflow > Export (API))"
                )
            if is_link(node["inputs"][input_name]):
                source = node["inputs"][input_name][0]
                raise RunError(
                    f"--{option.replace('_', '-')}: input '{input_name}' of node {node_id} ({class_type}) is wired "
                    f"to node {source} ({workflow.get(source, {}).get('class_type', '?')}); set the value there "
                    f"in the workflow or unwire it"
                )
            node["inputs"][input_name] = value
            changed.append(node_id)
    if not changed:
        wanted = " or ".join(f"{class_type}.{input_name}" for class_type, input_name in targets)
        raise RunError(f"--{option.replace('_', '-')}: the workflow has no {wanted} node to set it on")
    return changed


def reference_image_loaders(workflow: dict) -> list[str]:
    """The LoadImage nodes upstream of the reference-face encoder(s), in input order: the order of the faces."""
    encoders = [node_id for node_id, node in workflow.items() if node["class_type"] == REFERENCE_ENCODER]
    if not encoders:
        raise RunError(f"--face: the workflow has no {REFERENCE_ENCODER} node to take reference photos")
    loaders: list[str] = []
    visited: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in visited or node_id not in workflow:
            return
        visited.add(node_id)
        node = workflow[node_id]
        if node["class_type"] == IMAGE_LOADER:
            loaders.append(node_id)
            return
        for value in node["inputs"].values():
            if is_link(value):
                visit(value[0])

    for encoder in encoders:
        visit(encoder)
    return loaders


class ComfyClient:
    """ComfyUI's HTTP API, as its own frontend uses it."""

    def __init__(self, server: str):
        self.server = server.rstrip("/")

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

    def wait(self, prompt_id: str, timeout_s: float, poll_s: float = 0.5, report=print) -> dict:
        """Poll until the job leaves the queue; report its place in the queue when it changes."""
        deadline = time.monotonic() + timeout_s
        last_state = None
        while True:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            state = self._queue_state(prompt_id)
            if state != last_state:
                report(state)
                last_state = state
            if time.monotonic() > deadline:
                raise RunError(
                    f"gave up after {timeout_s:g} s: job {prompt_id} is still {state} on {self.server} "
                    f"(raise --timeout, or cancel it in ComfyUI's queue)"
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


def unused_path(output_dir: Path, name: str) -> Path:
    """output_dir/name, or name-1, name-2, ... so that an earlier run's file is never overwritten."""
    target = output_dir / name
    counter = 1
    while target.exists():
        target = output_dir / f"{Path(name).stem}-{counter}{Path(name).suffix}"
        counter += 1
    return target


def output_images(entry: dict) -> list[tuple[str, dict]]:
    """(node id, image reference) of every picture the job's nodes report in its history, in ComfyUI's order."""
    return [(node_id, image) for node_id, node_output in entry.get("outputs", {}).items() for image in node_output.get("images", [])]


def save_images(client: ComfyClient, entry: dict, output_dir: Path) -> list[Path]:
    """Download every picture of output_images(entry), in its order, one path each; never overwriting."""
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for _, image in output_images(entry):
        target = unused_path(output_dir, Path(image["filename"]).name)
        target.write_bytes(client.download(image))
        saved.append(target)
    return saved


# --- with no workflow and no server: the shipped workflows, and a ComfyUI of the runner's own -------------

SHIPPED_WORKFLOWS = {1: "facediffuser_single_subject.json", 2: "facediffuser_two_subjects.json"}  # by face count
CHECKPOINT_LOADERS = ("FaceDiffuserSDMLoader", "FaceDiffuserTDMLoader")
CHECKPOINT_FORMATS = (".safetensors", ".bin")
OWN_SERVER_START_TIMEOUT_S = 600.0
OWN_SERVER_STOP_TIMEOUT_S = 30.0


def shipped_workflow(faces: int) -> Path:
    if faces not in SHIPPED_WORKFLOWS:
        raise RunError(f"--face given {faces} time(s): without a workflow file the runner uses the shipped workflow for "
                       f"one or two people, so give --face once or twice, or pass a workflow of your own")
    return PACK_ROOT / "workflows" / "api" / SHIPPED_WORKFLOWS[faces]


def combo_options(spec: list) -> list:
    """A combo input's choices in /object_info: [choices, {...}] or ["COMBO", {"options": choices}]."""
    if spec and isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options", []) if len(spec) > 1 and isinstance(spec[1], dict) else []


def use_installed_checkpoints(workflow: dict, client: "ComfyClient", report=print) -> None:
    """A Face-diffuser loader naming a file the server lacks takes the same model in the other format, when the
    server has that: the shipped workflows name the converted .safetensors, the set-up leaves the .bin unless it
    converts, and either is the same model."""
    for node_id, node in workflow.items():
        name = node["inputs"].get("ckpt_name")
        if node["class_type"] not in CHECKPOINT_LOADERS or not isinstance(name, str):
            continue
        spec = client.get_json(f"/object_info/{node['class_type']}").get(node["class_type"], {})
        offered = combo_options(spec.get("input", {}).get("required", {}).get("ckpt_name", []))
        if name in offered:
            continue
        same_model = [Path(name).stem + suffix for suffix in CHECKPOINT_FORMATS if Path(name).stem + suffix in offered]
        if same_model:
            node["inputs"]["ckpt_name"] = same_model[0]
            report(f"node {node_id} ({node['class_type']}): the server has no {name}; using {same_model[0]}")


def comfyui_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=2) as response:
            return "system" in json.loads(response.read())
    except (OSError, ValueError):
        return False


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OwnComfyUI:
    """The ComfyUI in `root`, started by the runner with this Python, headless on 127.0.0.1 and a free port,
    in a process group of its own so that stopping it ends everything it started."""

    def __init__(self, root: Path, extra_args: list[str], report=print):
        self.root = root
        self.report = report
        self.url = f"http://127.0.0.1:{free_loopback_port()}"
        handle, log = tempfile.mkstemp(prefix="facediffuser-comfyui-", suffix=".log")
        self.log = Path(log)
        command = [sys.executable, str(root / "main.py"), "--listen", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
                   "--disable-auto-launch", *extra_args]
        group = {"start_new_session": True} if os.name == "posix" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        with os.fdopen(handle, "wb") as log_file:
            self.process = subprocess.Popen(command, cwd=root, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, **group)
        report(f"started ComfyUI from {root} (pid {self.process.pid}) at {self.url}; its log: {self.log}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_until_ready(self, timeout_s: float = OWN_SERVER_START_TIMEOUT_S) -> None:
        started = time.monotonic()
        while not comfyui_answers(self.url):
            if self.process.poll() is not None:
                raise RunError(f"the ComfyUI started from {self.root} exited with status {self.process.returncode} before "
                               f"answering; the end of its log ({self.log}):\n{self.log_tail()}")
            if time.monotonic() - started > timeout_s:
                raise RunError(f"the ComfyUI started from {self.root} did not answer within {timeout_s:g} s; see its log {self.log}")
            time.sleep(0.5)
        if not ComfyClient(self.url).get_json("/object_info/FaceDiffuserSNFSampler"):
            raise RunError(f"the ComfyUI started from {self.root} has not loaded the Face-diffuser nodes (is the pack in its "
                           f"custom_nodes folder?); look for 'Cannot import' in its log {self.log}")
        self.report(f"ComfyUI is ready ({time.monotonic() - started:.0f} s)")

    def stop(self) -> None:
        if self.process.poll() is None:
            if os.name == "posix":
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.terminate()
            try:
                self.process.wait(OWN_SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL) if os.name == "posix" else self.process.kill()
                self.process.wait(OWN_SERVER_STOP_TIMEOUT_S)
        self.report(f"stopped the ComfyUI started for this job (pid {self.process.pid})")


@contextlib.contextmanager
def server_for(args: argparse.Namespace):
    """The address to send the job to: --server; else the default address when a ComfyUI answers there; else a
    ComfyUI of the runner's own, stopped afterwards (also on errors and Ctrl-C) unless --keep-server."""
    if args.server or comfyui_answers(DEFAULT_SERVER):
        yield args.server or DEFAULT_SERVER
        return
    root = find_comfyui(args.comfyui)
    if root is None or not (root / "main.py").is_file():
        where = f"{args.comfyui} is not a ComfyUI folder" if args.comfyui else (
            f"this pack ({PACK_ROOT}) is not inside ComfyUI/custom_nodes and COMFYUI_PATH is not set")
        raise RunError(f"no ComfyUI server answers at {DEFAULT_SERVER}, and none can be started: {where}. Pass --comfyui "
                       f"<ComfyUI folder> to start that one, or start ComfyUI yourself and pass --server")
    print(f"no ComfyUI answers at {DEFAULT_SERVER}: starting one for this job")
    own = OwnComfyUI(root, shlex.split(args.comfyui_args or ""))
    ready = False
    try:
        own.wait_until_ready()
        ready = True
        yield own.url
    finally:
        if ready and args.keep_server and own.process.poll() is None:
            print(f"ComfyUI keeps running at {own.url} (pid {own.process.pid}; log {own.log}); stop it with `kill {own.process.pid}`")
        else:
            own.stop()
            if ready:  # a failed start keeps its log, which the error names
                own.log.unlink(missing_ok=True)


# --- best of N: several seeds, ranked by the Identity Score node -------------------------------------------

IDENTITY_NODE = "FaceDiffuserIdentityScore"
IDENTITY_RESULT = "facediffuser_identity"  # the node's UI result in /history (format: nodes/identity_score.py)
SAVE_NODE = "SaveImage"
SCORES_FILE = "identity_scores.json"


BEST_OF_N_OPTIONS = "--candidates/--keep-best"


def identity_score_node(workflow: dict, option: str = BEST_OF_N_OPTIONS) -> str:
    """The one Identity Score node that best-of-N ranks by; `option` names what asked for best-of-N."""
    nodes = [node_id for node_id, node in workflow.items() if node["class_type"] == IDENTITY_NODE]
    if len(nodes) != 1:
        raise RunError(
            f"{option}: best-of-N ranks the pictures by the workflow's {IDENTITY_NODE} node, but it has "
            f"{len(nodes) or 'no'} such node{'s' if len(nodes) > 1 else ''}{' (' + ', '.join(nodes) + ')' if nodes else ''}. "
            "Add one Face-diffuser Identity Score in ComfyUI (references: the reference photos; images: the decoded "
            "pictures that Save Image saves) and export the workflow again (Workflow > Export (API))"
        )
    return nodes[0]


def scored_pictures_saver(workflow: dict, identity_node: str, option: str = BEST_OF_N_OPTIONS) -> str:
    """The Save Image node that saves the very pictures the Identity Score node scores (same source)."""
    scored = workflow[identity_node]["inputs"].get("images")
    savers = sorted((node_id for node_id, node in workflow.items()
                     if node["class_type"] == SAVE_NODE and is_link(scored) and node["inputs"].get("images") == scored), key=str)
    if not savers:
        raise RunError(
            f"{option}: no {SAVE_NODE} node saves the pictures that node {identity_node} ({IDENTITY_NODE}) "
            f"scores; connect the same images (its 'images' input comes from {scored}) to a Save Image"
        )
    return savers[0]


def current_value(workflow: dict, option: str):
    """The value the workflow gives `option` (its first target node's input)."""
    for node in workflow.values():
        for class_type, input_name in OVERRIDE_TARGETS[option]:
            if node["class_type"] == class_type and not is_link(node["inputs"].get(input_name)):
                return node["inputs"].get(input_name)
    raise RunError(f"--{option}: the workflow has no unwired {' or '.join(c + '.' + i for c, i in OVERRIDE_TARGETS[option])}")


def scored_pictures(entry: dict, identity_node: str, saver: str | None) -> tuple[list[dict], list[dict]]:
    """From a finished job's history: the Identity Score node's result per picture (format: nodes/identity_score.py)
    and, in the same order, the references of the pictures `saver` saved (none without a saver)."""
    outputs = entry.get("outputs", {})
    pictures = outputs.get(identity_node, {}).get(IDENTITY_RESULT)
    if pictures is None:
        raise RunError(f"node {identity_node} ({IDENTITY_NODE}) reported no scores; is the pack up to date on the server?")
    if saver is None:
        return pictures, []
    images = outputs.get(saver, {}).get("images", [])
    if len(images) != len(pictures):
        raise RunError(f"node {saver} saved {len(images)} picture(s) but {len(pictures)} were scored")
    return pictures, images


def rank_pictures(candidates: list[dict]) -> list[tuple[int, int]]:
    """(candidate index, batch index) of every scored picture, best first: highest score, then earlier
    seed, then earlier picture of the batch."""
    pictures = [(picture["score"], index, picture["batch_index"])
                for index, candidate in enumerate(candidates) for picture in candidate["pictures"]]
    return [(index, batch) for _, index, batch in sorted(pictures, key=lambda p: (-p[0], p[1], p[2]))]


def describe_candidate(seed: int, pictures: list[dict]) -> str:
    parts = []
    for picture in pictures:
        subjects = ", ".join(
            f"subject {s['subject'] + 1} " + ("missing" if s["missing"] else f"{s['similarity']:.3f}" + (" mixed" if s["mixed"] else ""))
            for s in picture["subjects"])
        parts.append(f"picture {picture['batch_index']}: score {picture['score']:.3f} ({subjects})")
    return f"seed {seed}: " + "; ".join(parts)


def run_best_of_n(args: argparse.Namespace, client: ComfyClient) -> list[Path]:
    """Queue one job per seed, rank every picture by the Identity Score node, download the best
    --keep-best and write every seed's per-subject scores to identity_scores.json beside them."""
    candidates_count = 1 if args.candidates is None else args.candidates
    if candidates_count < 1 or args.keep_best < 1:
        raise RunError("--candidates and --keep-best must be 1 or more")
    workflow = prepare_workflow(args, client)
    identity_node = identity_score_node(workflow)
    saver = scored_pictures_saver(workflow, identity_node)
    first_seed = args.seed if args.seed is not None else current_value(workflow, "seed")
    client_id = uuid.uuid4().hex
    jobs = []
    for seed in range(first_seed, first_seed + candidates_count):
        set_override(workflow, "seed", seed)
        jobs.append((seed, client.submit(workflow, client_id=client_id)))
    print(f"submitted {len(jobs)} job(s) to {client.server}, seeds {first_seed} to {first_seed + len(jobs) - 1}")
    candidates = []
    for seed, prompt_id in jobs:
        entry = client.wait(prompt_id, args.timeout, report=lambda state, seed=seed: print(f"  seed {seed}: {state}"))
        if entry.get("status", {}).get("status_str") != "success":
            raise RunError(f"seed {seed}: {describe_failure(entry)}")
        try:
            pictures, images = scored_pictures(entry, identity_node, saver)
        except RunError as error:
            raise RunError(f"seed {seed}: {error}") from None
        pictures = [{**picture, "kept_as": None} for picture in pictures]
        candidates.append({"seed": seed, "prompt_id": prompt_id, "pictures": pictures, "images": images})
        print(f"  {describe_candidate(seed, pictures)}")

    args.output.mkdir(parents=True, exist_ok=True)
    kept, saved = [], []
    for rank, (index, batch_index) in enumerate(rank_pictures(candidates)[:args.keep_best], start=1):
        candidate = candidates[index]
        picture = candidate["pictures"][batch_index]
        target = unused_path(args.output, f"best{rank:02d}_seed{candidate['seed']}_{batch_index}.png")
        target.write_bytes(client.download(candidate["images"][batch_index]))
        picture["kept_as"] = target.name
        kept.append({"rank": rank, "seed": candidate["seed"], "batch_index": batch_index, "score": picture["score"], "file": target.name})
        saved.append(target)
    report = {
        "workflow": str(args.workflow), "server": client.server, "identity_node": identity_node, "keep_best": args.keep_best,
        "candidates": [{"seed": c["seed"], "prompt_id": c["prompt_id"], "pictures": c["pictures"]} for c in candidates],
        "kept": kept,
    }
    scores_file = unused_path(args.output, SCORES_FILE)
    scores_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return [*saved, scores_file]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a Face-diffuser API-format workflow on a ComfyUI server (or one it starts) and save the images.")
    parser.add_argument("workflow", type=Path, nargs="?",
                        help="API-format workflow JSON (default: the shipped single-subject workflow for one --face, "
                             "the two-subject one for two)")
    parser.add_argument("--server", help=f"ComfyUI's address (default: {DEFAULT_SERVER} when a ComfyUI answers there, "
                                         f"else one the runner starts and stops)")
    parser.add_argument("--face", action="append", type=Path, default=[], metavar="PHOTO",
                        help="a reference photo, uploaded to the server; repeat once per <|image|> marker, in order")
    parser.add_argument("--prompt", help="the subject prompt, with <|image|> after each person's noun")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float, help="guidance scale (official 5.0)")
    parser.add_argument("--alpha", type=float, help="fraction of the steps where scene construction ends")
    parser.add_argument("--beta", type=float, help="fraction of the steps where subject-scene fusion ends")
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--output", type=Path, default=Path("facediffuser_output"),
                        help="folder for the images (default ./facediffuser_output)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result (default 3600)")
    parser.add_argument("--candidates", type=int, metavar="N",
                        help="best of N: run N seeds (--seed, --seed+1, ...; default from the workflow's seed) through a "
                             "workflow with a Face-diffuser Identity Score node and rank the pictures by its score")
    parser.add_argument("--keep-best", type=int, dest="keep_best", metavar="K",
                        help="with --candidates: save the best K pictures (default 1) and identity_scores.json beside them")
    own = parser.add_argument_group("the ComfyUI the runner starts when none answers (no --server)")
    own.add_argument("--comfyui", type=Path, help="its folder (default: the ComfyUI this pack is installed in, or $COMFYUI_PATH)")
    own.add_argument("--comfyui-args", metavar="ARGS",
                     help='more arguments for its main.py, e.g. "--lowvram" or "--cpu --base-directory /data/comfy"')
    own.add_argument("--keep-server", action="store_true", help="leave it running after the job, for the next ones")
    args = parser.parse_args(argv)
    if args.candidates is not None and args.keep_best is None:
        args.keep_best = 1
    return args


def prepare_workflow(args: argparse.Namespace, client: ComfyClient) -> dict:
    workflow = load_api_workflow(args.workflow or shipped_workflow(len(args.face)))
    for option in OVERRIDE_TARGETS:
        value = getattr(args, option)
        if value is not None:
            set_override(workflow, option, value)
    if args.face:
        loaders = reference_image_loaders(workflow)
        if len(loaders) != len(args.face):
            raise RunError(
                f"--face given {len(args.face)} time(s) but the workflow loads {len(loaders)} reference photo(s) "
                f"(LoadImage nodes {', '.join(loaders) or 'none'} feeding {REFERENCE_ENCODER}); give one --face per photo"
            )
        for node_id, photo in zip(loaders, args.face):
            workflow[node_id]["inputs"]["image"] = client.upload_image(photo)
    use_installed_checkpoints(workflow, client)
    return workflow


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with server_for(args) as server:
            return run(args, ComfyClient(server))
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, client: ComfyClient) -> int:
    if args.keep_best is not None:
        for path in run_best_of_n(args, client):
            print(f"saved {path}")
        return 0
    workflow = prepare_workflow(args, client)
    prompt_id = client.submit(workflow, client_id=uuid.uuid4().hex)
    print(f"submitted to {client.server} as job {prompt_id}")
    entry = client.wait(prompt_id, args.timeout, report=lambda state: print(f"  {state}"))
    if entry.get("status", {}).get("status_str") != "success":
        raise RunError(describe_failure(entry))
    saved = save_images(client, entry, args.output)
    if not saved:
        print("the workflow finished but produced no images (does it end in a SaveImage node?)", file=sys.stderr)
        return 1
    for path in saved:
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
