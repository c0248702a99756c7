"""A stand-in for ComfyUI's HTTP API, for the batch client's fault tests on Ray: it starts in a fraction of a
second, runs a prompt in a few hundredths, and misbehaves on request, which a real ComfyUI cannot be made to do
on cue. A folder whose main.py links to this file passes for a ComfyUI folder (--comfyui); the Ray workers start
it as they start ComfyUI, with the same command line.

It serves what the client uses: /system_stats, /object_info/<node>, /upload/image, /prompt, /queue, /history,
/view, /interrupt. A prompt's "seed" is the noise_seed of its RandomNoise node. Files in its folder steer it and
record what it did:
    sent.log        a line "<seed> <pid>" for every prompt it is sent (what the manifest's attempts must match)
    faults.json     {"die": [seeds], "die_once": [...], "hang_once": [...], "fail": [...], "seconds": S}, read at each
                    prompt (seconds: how long a prompt runs, default RUN_SECONDS):
                    die exits the process when the prompt starts, die_once the first time only; hang_once wedges the
                    server (that prompt and every later one never end, while HTTP still answers, as a hung GPU
                    does); fail ends the prompt with an error in a node
    refuse_start    while this file exists, a stand-in exits at once with status 1 (a restart that fails)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RUN_SECONDS = 0.05


def png(seed: int) -> bytes:
    """A valid 1x1 PNG whose one pixel depends on the seed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    pixel = bytes([0, seed % 256, (seed // 256) % 256, 77])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))
            + chunk(b"IDAT", zlib.compress(pixel)) + chunk(b"IEND", b""))


class StandIn:
    def __init__(self, root: Path, folders: dict[str, Path]):
        self.root = root
        self.folders = folders
        self.lock = threading.Condition()
        self.pending: list[tuple[int, str, dict]] = []
        self.running: tuple[int, str, dict] | None = None
        self.history: dict[str, dict] = {}
        self.numbers = iter(range(10 ** 9))
        self.pictures = iter(range(1, 10 ** 9))
        self.wedged = False
        self.interrupted: set[str] = set()

    def faults(self) -> dict:
        path = self.root / "faults.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def fault_once(self, kind: str, seed: int) -> bool:
        marker = self.root / f"{kind}-{seed}.done"
        if seed not in self.faults().get(kind, []) or marker.exists():
            return False
        marker.write_text("")
        return True

    def submit(self, prompt: dict) -> dict:
        errors = {node_id: {"class_type": node["class_type"], "errors": [{"message": "Value 0 smaller than min of 1", "details": "steps"}]}
                  for node_id, node in prompt.items() if node.get("inputs", {}).get("steps") == 0}
        if errors:
            return {"error": {"message": "Prompt outputs failed validation"}, "node_errors": errors}
        seed = next((node["inputs"].get("noise_seed", 0) for node in prompt.values() if node["class_type"] == "RandomNoise"), 0)
        prompt_id = uuid.uuid4().hex
        with open(self.root / "sent.log", "a") as log:
            log.write(f"{seed} {os.getpid()}\n")
        with self.lock:
            number = next(self.numbers)
            self.pending.append((number, prompt_id, prompt))
            self.lock.notify_all()
        return {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def work(self) -> None:
        while True:
            with self.lock:
                while not self.pending or self.wedged:
                    self.lock.wait()
                self.running = self.pending.pop(0)
            number, prompt_id, prompt = self.running
            seed = next((node["inputs"].get("noise_seed", 0) for node in prompt.values() if node["class_type"] == "RandomNoise"), 0)
            faults = self.faults()
            if seed in faults.get("die", []) or self.fault_once("die_once", seed):
                os._exit(1)
            if self.fault_once("hang_once", seed):
                with self.lock:
                    self.wedged = True  # this prompt, and every one after it, never ends
                continue
            time.sleep(faults.get("seconds", RUN_SECONDS))
            if prompt_id in self.interrupted:
                messages = [["execution_interrupted", {"node_id": "1", "node_type": "EmptyImage"}]]
                entry = {"status": {"status_str": "error", "completed": False, "messages": messages}, "outputs": {}}
            elif seed in faults.get("fail", []):
                messages = [["execution_error", {"node_id": "1", "node_type": "EmptyImage", "exception_type": "ValueError",
                                                 "exception_message": "no face found (stand-in)"}]]
                entry = {"status": {"status_str": "error", "completed": False, "messages": messages}, "outputs": {}}
            else:
                name = f"standin_{next(self.pictures):05d}_.png"
                (self.folders["output"] / name).write_bytes(png(seed))
                saver = next(node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage")
                entry = {"status": {"status_str": "success", "completed": True, "messages": []},
                         "outputs": {saver: {"images": [{"filename": name, "subfolder": "", "type": "output"}]}}}
            with self.lock:
                self.history[prompt_id] = entry
                self.running = None

    def queue(self) -> dict:
        with self.lock:
            running = [[self.running[0], self.running[1]]] if self.running else []
            return {"queue_running": running, "queue_pending": [[number, prompt_id] for number, prompt_id, _ in self.pending]}

    def cancel(self, prompt_ids: list[str]) -> None:
        with self.lock:
            self.pending = [item for item in self.pending if item[1] not in prompt_ids]
            if self.running and self.running[1] in prompt_ids:
                self.interrupted.add(self.running[1])


def handler(stand_in: StandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def answer(self, payload, status: int = 200, content_type: str = "application/json") -> None:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/system_stats":
                self.answer({"system": {"os": "stand-in"}, "devices": []})
            elif url.path.startswith("/object_info/"):
                node = url.path.rsplit("/", 1)[1]
                self.answer({node: {"input": {"required": {}}}} if node == "FaceDiffuserSNFSampler" else {})
            elif url.path == "/queue":
                self.answer(stand_in.queue())
            elif url.path.startswith("/history/"):
                prompt_id = url.path.rsplit("/", 1)[1]
                with stand_in.lock:
                    entry = stand_in.history.get(prompt_id)
                self.answer({prompt_id: entry} if entry else {})
            elif url.path == "/view":
                query = {name: values[0] for name, values in parse_qs(url.query).items()}
                path = stand_in.folders[query.get("type", "output")] / query.get("subfolder", "") / query["filename"]
                if path.is_file():
                    self.answer(path.read_bytes(), content_type="image/png")
                else:
                    self.answer({"error": "not found"}, 404)
            else:
                self.answer({"error": "unknown"}, 404)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            url = urlsplit(self.path)
            if url.path == "/prompt":
                answer = stand_in.submit(json.loads(body)["prompt"])
                self.answer(answer, 400 if "error" in answer else 200)
            elif url.path == "/upload/image":
                boundary = self.headers["Content-Type"].split("boundary=", 1)[1].encode()
                part = next(part for part in body.split(b"--" + boundary) if b'name="image"' in part)
                head, content = part.split(b"\r\n\r\n", 1)
                name = head.split(b'filename="', 1)[1].split(b'"', 1)[0].decode()
                (stand_in.folders["input"] / name).write_bytes(content[:-2])
                self.answer({"name": name, "subfolder": "", "type": "input"})
            elif url.path == "/queue":
                stand_in.cancel(json.loads(body).get("delete", []))
                self.answer({})
            elif url.path == "/interrupt":
                stand_in.cancel([json.loads(body or b"{}").get("prompt_id")])
                self.answer({})
            else:
                self.answer({"error": "unknown"}, 404)

    return Handler


def main() -> None:
    root = Path(sys.argv[0]).parent  # the folder passing for ComfyUI: main.py links here
    if (root / "refuse_start").exists():
        sys.exit("stand-in: refuse_start is there: exiting as a ComfyUI that cannot start")
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    for name in ("input", "output", "temp"):
        parser.add_argument(f"--{name}-directory", type=Path, default=root / name)
    args, _ = parser.parse_known_args()
    folders = {"input": args.input_directory, "output": args.output_directory, "temp": args.temp_directory}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    stand_in = StandIn(root, folders)
    threading.Thread(target=stand_in.work, daemon=True).start()
    ThreadingHTTPServer((args.listen, args.port), handler(stand_in)).serve_forever()


if __name__ == "__main__":
    main()
