"""The runner's command line, checked before anything starts: the picture's size, the prompt's <|image|> markers
against the faces, every option explained in --help, and Ctrl-C's line true of what was ended. A mistake found
after ComfyUI started costs the user its start and the models' load (40 s and more); none of these tests starts one."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import pack_scripts
from facediffuser_client import api_workflow, headless
from runner_runs import CUSTOM_SAMPLING_WORKFLOW, fake_comfyui

runner = pack_scripts.load("facediffuser_run")


def photo(tmp_path, name="me.png"):
    path = tmp_path / name
    path.write_bytes(b"png")
    return path


def run_without_a_server(tmp_path, capsys, *args) -> str:
    """The runner with no ComfyUI at the default address and a fake one it would start: the error it prints, after
    checking that no ComfyUI was started."""
    root = fake_comfyui(tmp_path, "pack")
    assert runner.main([*args, "--comfyui", str(root)]) == 1
    assert not (root / "argv.json").exists(), "a ComfyUI was started"
    return capsys.readouterr().err


def test_every_option_of_the_runner_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(["--help"])
    text = capsys.readouterr().out
    options = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    undescribed = [block.split()[0] for block in options if block.strip() and len(block.split("  ")) < 3
                   and not re.search(r"\S  +\S", block.strip())]
    assert undescribed == [], text
    for option, words in (("--seed", "starting noise"), ("--steps", "on a CPU start with 20"), ("--width", "multiple of 8")):
        assert words in " ".join(next(block for block in options if block.strip().startswith(option)).split())


@pytest.mark.parametrize("name", ["facediffuser_single_subject", "facediffuser_two_subjects_regions", "facediffuser_custom_sampling"])
def test_width_and_height_set_the_picture_size_of_the_shipped_workflows(tmp_path, name):
    faces = [str(photo(tmp_path, f"{i}.png")) for i in range(2 if "two" in name else 1)]
    args = runner.parse_args([str(api_workflow.PACK_ROOT / "workflows" / "api" / f"{name}.json"),
                              *(arg for face in faces for arg in ("--face", face)), "--width", "384", "--height", "256"])
    workflow = headless.configured_workflow(args)
    sized = [(node["class_type"], node["inputs"]["width"], node["inputs"]["height"]) for node in workflow.values()
             if "width" in node["inputs"]]
    assert ("EmptyLatentImage", 384, 256) in sized
    # the regions' masks follow: they must have the picture's size
    assert {(width, height) for _, width, height in sized} == {(384, 256)}, sized
    assert ("FaceDiffuserRegionLayout" in {class_type for class_type, _, _ in sized}) == ("regions" in name)


@pytest.mark.parametrize("size, fits", [("500", 496), ("0", 8), ("-64", 8)])
def test_a_size_that_is_not_a_multiple_of_8_is_refused_before_anything_starts(tmp_path, capsys, nothing_at_the_default_address, size, fits):
    message = run_without_a_server(tmp_path, capsys, "--face", str(photo(tmp_path)), "--prompt", "a man <|image|>", "--height", size)
    assert f"--height {size}: give a positive multiple of 8" in message and f"e.g. --height {fits}" in message


def test_a_size_for_a_workflow_without_a_latent_to_take_it_is_refused_before_anything_starts(tmp_path, capsys, nothing_at_the_default_address):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(CUSTOM_SAMPLING_WORKFLOW))
    message = run_without_a_server(tmp_path, capsys, str(path), "--width", "256")
    assert "--width: the workflow has no EmptyLatentImage.width node to set it on" in message


@pytest.mark.parametrize("prompt, said", [
    ("a photo of a man hiking in the alps", "the prompt has 0 <|image|> markers but 1 reference face was given"),
    ("a man <|image|> and a woman <|image|> at the beach", "the prompt has 2 <|image|> markers but 1 reference face was given"),
    ("<|image|> hiking", "the prompt starts with <|image|>"),
])
def test_the_prompts_markers_are_checked_against_the_faces_before_anything_starts(tmp_path, capsys, nothing_at_the_default_address,
                                                                                  prompt, said):
    message = run_without_a_server(tmp_path, capsys, "--face", str(photo(tmp_path)), "--prompt", prompt)
    assert f"error: --prompt: {said}" in message
    assert "write one marker after each person's noun" in message or "right after the noun" in message


def test_the_workflows_own_prompt_is_checked_against_the_faces_given(tmp_path, capsys, nothing_at_the_default_address):
    two = api_workflow.PACK_ROOT / "workflows" / "api" / "facediffuser_two_subjects.json"
    workflow = json.loads(two.read_text())
    for node in workflow.values():
        if node["class_type"] == "FaceDiffuserSubjectPrompt":
            node["inputs"]["text"] = "a man <|image|> and a woman at the beach"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(workflow))
    message = run_without_a_server(tmp_path, capsys, str(path), "--face", str(photo(tmp_path, "a.png")), "--face", str(photo(tmp_path, "b.png")))
    assert "the workflow's prompt (node 10) 'a man <|image|> and a woman at the beach': the prompt has 1 <|image|> marker but " \
           "2 reference faces were given" in message


def test_errors_naming_a_photo_of_the_batch_name_its_file(tmp_path):
    photos = [tmp_path / "me.jpg", tmp_path / "my friend.jpg"]
    node_error = ("ComfyUI failed in node 8 (FaceDiffuserEncodeReferenceFaces): ValueError: Face-diffuser Encode Reference Faces: "
                  "no face found in image 1 of the batch (counting from 0)")
    assert headless.naming_the_photos(node_error, photos) == f"{node_error}\n(photo 1 is --face {photos[1]})"
    identity = "ComfyUI failed in node 12 (FaceDiffuserIdentityScore): ValueError: no face found in reference photo 0 (counting from 0)"
    assert headless.naming_the_photos(identity, photos).endswith(f"(photo 0 is --face {photos[0]})")
    assert headless.naming_the_photos("ComfyUI failed in node 3 (VAEDecode): RuntimeError: out of memory", photos).endswith("memory")


# --- Ctrl-C against a server the user runs ----------------------------------------------------------------------


class PatientComfyUI:
    """A ComfyUI stand-in on loopback that accepts a job and keeps it running until it is cancelled."""

    def __init__(self):
        self.cancelled: list[str] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, payload):
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/system_stats":
                    return self.answer({"system": {}})
                if self.path == "/queue":
                    return self.answer({"queue_running": [[0, "job-1"]], "queue_pending": []})
                self.answer({})  # /history/job-1: not finished; /object_info/...: nothing to adapt

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/upload/image":
                    return self.answer({"name": "me.png", "subfolder": ""})
                if self.path == "/prompt":
                    return self.answer({"prompt_id": "job-1", "node_errors": {}})
                if self.path == "/queue":
                    stand_in.cancelled += json.loads(body).get("delete", [])
                self.answer({})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_ctrl_c_against_the_users_own_server_says_it_keeps_running(tmp_path):
    patient = PatientComfyUI()
    photo(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(pack_scripts.SCRIPTS_DIR)}
    try:
        process = subprocess.Popen(
            [sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_run.py"), "--server", patient.url, "--face", "me.png",
             "--prompt", "a man <|image|>", "--output", "out"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out = ""
        deadline = time.monotonic() + 120
        while "submitted to" not in out and time.monotonic() < deadline:
            out += process.stdout.readline()
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=60)
    finally:
        patient.close()
    assert process.returncode == 130, out + rest + err
    (line,) = err.strip().splitlines()
    assert line.startswith("interrupted: nothing of this run is left running (its job taken off the server; "
                           f"the ComfyUI at {patient.url} is yours and keeps running)")
    assert "started for it" not in line
    assert patient.cancelled == ["job-1"]


def test_ctrl_c_message_for_a_comfyui_the_runner_started(tmp_path):
    args = runner.parse_args(["--face", "me.png", "--output", str(tmp_path)])
    assert "(its job taken off the server; the ComfyUI started for it stopped)" in runner.interrupted_message(
        args, "http://127.0.0.1:1234", job_cancelled=True)
    assert runner.interrupted_message(args, None, job_cancelled=False).startswith(
        "interrupted: nothing of this run is left running; pictures saved before")
