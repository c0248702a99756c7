#!/usr/bin/env python3
"""Run a Face-diffuser workflow on a ComfyUI server from the command line and save the images it makes.

    python scripts/facediffuser_run.py workflows/api/facediffuser_single_subject.json \\
        --face me.jpg --prompt "a photo of a man <|image|> hiking in the alps" --seed 7 --output out/

The workflow must be in ComfyUI's API format (the copies in workflows/api/, or "Export (API)" in ComfyUI).
Overrides find their nodes by node type, never by node id, so they work on any workflow built from the
same nodes; an override whose node type is absent is an error. Reference photos are uploaded to the
server, so the server may run on another machine. Only the standard library is used: any Python 3.10+
that reaches the server can run this, without ComfyUI or torch.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

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
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise RunError(
                f"no ComfyUI server answers at {self.server} ({reason}): start it with `python main.py --listen "
                f"127.0.0.1 --port 8188` in your ComfyUI folder, or point --server at the one you run"
            ) from None

    def get_json(self, path: str):
        return json.loads(self._request(path))

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
            raise RunError(describe_rejection(error.read(), workflow)) from None
        return answer["prompt_id"]

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


def save_images(client: ComfyClient, entry: dict, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            target = unused_path(output_dir, Path(image["filename"]).name)
            target.write_bytes(client.download(image))
            saved.append(target)
    return saved


# --- best of N: several seeds, ranked by the Identity Score node -------------------------------------------

IDENTITY_NODE = "FaceDiffuserIdentityScore"
IDENTITY_RESULT = "facediffuser_identity"  # the node's UI result in /history (format: nodes/identity_score.py)
SAVE_NODE = "SaveImage"
SCORES_FILE = "identity_scores.json"


def identity_score_node(workflow: dict) -> str:
    nodes = [node_id for node_id, node in workflow.items() if node["class_type"] == IDENTITY_NODE]
    if len(nodes) != 1:
        raise RunError(
            f"--candidates/--keep-best rank the pictures by the workflow's {IDENTITY_NODE} node, but it has "
            f"{len(nodes) or 'no'} such node{'s' if len(nodes) > 1 else ''}{' (' + ', '.join(nodes) + ')' if nodes else ''}. "
            "Add one Face-diffuser Identity Score in ComfyUI (references: the reference photos; images: the decoded "
            "pictures that Save Image saves) and export the workflow again (Workflow > Export (API))"
        )
    return nodes[0]


def scored_pictures_saver(workflow: dict, identity_node: str) -> str:
    """The Save Image node that saves the very pictures the Identity Score node scores (same source)."""
    scored = workflow[identity_node]["inputs"].get("images")
    savers = sorted((node_id for node_id, node in workflow.items()
                     if node["class_type"] == SAVE_NODE and is_link(scored) and node["inputs"].get("images") == scored), key=str)
    if not savers:
        raise RunError(
            f"--candidates/--keep-best: no {SAVE_NODE} node saves the pictures that node {identity_node} ({IDENTITY_NODE}) "
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
        outputs = entry.get("outputs", {})
        pictures = outputs.get(identity_node, {}).get(IDENTITY_RESULT)
        images = outputs.get(saver, {}).get("images", [])
        if pictures is None:
            raise RunError(f"seed {seed}: node {identity_node} ({IDENTITY_NODE}) reported no scores; is the pack up to date on the server?")
        if len(images) != len(pictures):
            raise RunError(f"seed {seed}: node {saver} saved {len(images)} picture(s) but {len(pictures)} were scored")
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
        description="Submit a Face-diffuser API-format workflow to a running ComfyUI server and save the images.")
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON, e.g. workflows/api/facediffuser_single_subject.json")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI's address (default {DEFAULT_SERVER})")
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
    args = parser.parse_args(argv)
    if args.candidates is not None and args.keep_best is None:
        args.keep_best = 1
    return args


def prepare_workflow(args: argparse.Namespace, client: ComfyClient) -> dict:
    workflow = load_api_workflow(args.workflow)
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
    return workflow


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = ComfyClient(args.server)
    if args.keep_best is not None:
        try:
            saved = run_best_of_n(args, client)
        except RunError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for path in saved:
            print(f"saved {path}")
        return 0
    try:
        workflow = prepare_workflow(args, client)
        prompt_id = client.submit(workflow, client_id=uuid.uuid4().hex)
        print(f"submitted to {client.server} as job {prompt_id}")
        entry = client.wait(prompt_id, args.timeout, report=lambda state: print(f"  {state}"))
        if entry.get("status", {}).get("status_str") != "success":
            raise RunError(describe_failure(entry))
        saved = save_images(client, entry, args.output)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not saved:
        print("the workflow finished but produced no images (does it end in a SaveImage node?)", file=sys.stderr)
        return 1
    for path in saved:
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
