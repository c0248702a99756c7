"""scripts/facediffuser_run.py: overrides by node type (plain tier) and whole runs against a real ComfyUI
server started on 127.0.0.1 (needs COMFYUI_PATH; skipped with the harness's reason otherwise)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_server
import pack_scripts
from runner_runs import CUSTOM_SAMPLING_WORKFLOW, fake_comfyui, write
from facediffuser_client import api_workflow, best_of_n, headless, http_api, own_comfyui

runner = pack_scripts.load("facediffuser_run")

SNF_WORKFLOW = {
    "1": {"class_type": "FaceDiffuserSDMLoader", "inputs": {"sdm_name": "facediffuser_sdm.safetensors"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "woman.png"}},
    "3": {"class_type": "LoadImage", "inputs": {"image": "man.png"}},
    "4": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["2", 0]}},
    "5": {"class_type": "FaceDiffuserEncodeReferenceFaces", "inputs": {"subject_encoder": ["1", 1], "images": ["4", 0]}},
    "6": {"class_type": "FaceDiffuserSubjectPrompt", "inputs": {"text": "a man <|image|>", "face_embeds": ["5", 0]}},
    "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "8": {"class_type": "FaceDiffuserSNFSampler", "inputs": {"seed": 0, "steps": 50, "cfg": 5.0, "alpha": 0.3, "beta": 0.6,
                                                           "latent_image": ["7", 0], "conditioning": ["6", 0]}},
    "9": {"class_type": "LoadImage", "inputs": {"image": "unrelated.png"}},  # not a reference photo
    "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}},
}


def test_overrides_find_their_nodes_by_type_in_either_sampling_style():
    workflow = copy.deepcopy(SNF_WORKFLOW)
    assert api_workflow.set_override(workflow, "seed", 42) == ["8"]
    assert api_workflow.set_override(workflow, "alpha", 0.25) == ["8"]
    assert api_workflow.set_override(workflow, "prompt", "a woman <|image|>") == ["6"]
    assert api_workflow.set_override(workflow, "batch_size", 3) == ["7"]
    assert workflow["8"]["inputs"]["seed"] == 42 and workflow["8"]["inputs"]["alpha"] == 0.25
    assert workflow["6"]["inputs"]["text"] == "a woman <|image|>" and workflow["7"]["inputs"]["batch_size"] == 3

    custom = copy.deepcopy(CUSTOM_SAMPLING_WORKFLOW)
    api_workflow.set_override(custom, "seed", 9)
    api_workflow.set_override(custom, "steps", 20)
    api_workflow.set_override(custom, "beta", 0.7)
    assert custom["2"]["inputs"]["noise_seed"] == 9 and custom["3"]["inputs"]["steps"] == 20
    assert custom["1"]["inputs"]["beta"] == 0.7


def test_an_override_without_its_node_is_an_error_not_ignored():
    with pytest.raises(http_api.RunError, match="--batch-size: the workflow has no EmptyLatentImage.batch_size"):
        api_workflow.set_override(copy.deepcopy(CUSTOM_SAMPLING_WORKFLOW), "batch_size", 2)
    with pytest.raises(http_api.RunError, match="no FaceDiffuserSubjectPrompt.text"):
        api_workflow.set_override(copy.deepcopy(CUSTOM_SAMPLING_WORKFLOW), "prompt", "x")


def test_an_override_refuses_to_cut_a_wired_input():
    workflow = copy.deepcopy(SNF_WORKFLOW)
    workflow["8"]["inputs"]["seed"] = ["2", 0]
    with pytest.raises(http_api.RunError, match=r"input 'seed' of node 8 \(FaceDiffuserSNFSampler\) is wired to node 2"):
        api_workflow.set_override(workflow, "seed", 1)


def test_an_override_refuses_a_node_without_that_input():
    workflow = copy.deepcopy(CUSTOM_SAMPLING_WORKFLOW)
    del workflow["1"]["inputs"]["alpha"]
    with pytest.raises(http_api.RunError, match=r"node 1 \(FaceDiffuserGuider\) has no input 'alpha'.*Export \(API\)"):
        api_workflow.set_override(workflow, "alpha", 0.5)


def test_reference_photos_are_the_loaders_feeding_the_encoder_in_input_order():
    assert api_workflow.reference_image_loaders(SNF_WORKFLOW) == ["3", "2"]
    with pytest.raises(http_api.RunError, match="no FaceDiffuserEncodeReferenceFaces"):
        api_workflow.reference_image_loaders(CUSTOM_SAMPLING_WORKFLOW)


def test_face_count_must_match_the_workflow(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(SNF_WORKFLOW))
    args = runner.parse_args([str(path), "--face", "a.png"])
    with pytest.raises(http_api.RunError, match=r"--face given 1 time\(s\) but the workflow loads 2 reference photo\(s\) \(LoadImage nodes 3, 2"):
        headless.prepare_workflow(args, http_api.ComfyClient("http://127.0.0.1:9"))


def test_ui_format_and_malformed_files_are_refused_with_the_fix(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(http_api.RunError, match="UI-format workflow.*Export \\(API\\)"):
        api_workflow.load_api_workflow(ui)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(http_api.RunError, match="not valid JSON"):
        api_workflow.load_api_workflow(broken)
    with pytest.raises(http_api.RunError, match="workflow file not found"):
        api_workflow.load_api_workflow(tmp_path / "missing.json")


def test_server_down_is_a_clear_error(tmp_path, capsys):
    port = comfy_server.free_port()
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(CUSTOM_SAMPLING_WORKFLOW))
    assert runner.main([str(path), "--server", f"http://127.0.0.1:{port}"]) == 1
    message = capsys.readouterr().err
    assert f"no ComfyUI server answers at http://127.0.0.1:{port}" in message
    assert f"python main.py --listen 127.0.0.1 --port {port}`" in message  # the port the user gave, not 8188


@pytest.mark.parametrize("faces", [1, 2])
def test_without_a_workflow_the_shipped_one_for_the_face_count_runs(faces):
    workflow = api_workflow.load_api_workflow(api_workflow.shipped_workflow(faces))
    assert len(api_workflow.reference_image_loaders(workflow)) == faces


def test_three_faces_without_a_workflow_ask_for_one():
    with pytest.raises(http_api.RunError, match=r"--face given 3 time\(s\): without a workflow file .* one or two people"):
        api_workflow.shipped_workflow(3)


class ObjectInfo(http_api.ComfyClient):
    """A client whose server offers these files to the Face-diffuser loaders."""

    def __init__(self, files):
        super().__init__("http://127.0.0.1:1")  # never asked: get_json answers
        self.files = files

    def get_json(self, path):
        node = path.rsplit("/", 1)[1]
        return {node: {"input": {"required": {"ckpt_name": ["COMBO", {"options": self.files}]}}}}


def test_a_checkpoint_the_server_lacks_is_taken_in_its_other_format():
    workflow = {
        "1": {"class_type": "FaceDiffuserSDMLoader", "inputs": {"ckpt_name": "facediffuser_sdm.safetensors"}},
        "2": {"class_type": "FaceDiffuserTDMLoader", "inputs": {"ckpt_name": "facediffuser_tdm.safetensors"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "facediffuser_tdm.safetensors"}},
    }
    notes = []
    api_workflow.use_installed_checkpoints(workflow, ObjectInfo(["facediffuser_sdm.bin", "facediffuser_tdm.safetensors", "x.bin"]), notes.append)
    assert workflow["1"]["inputs"]["ckpt_name"] == "facediffuser_sdm.bin"
    assert workflow["2"]["inputs"]["ckpt_name"] == "facediffuser_tdm.safetensors"
    assert notes == ["node 1 (FaceDiffuserSDMLoader): the server has no facediffuser_sdm.safetensors; using facediffuser_sdm.bin"]
    # Neither format there: left as it is, for ComfyUI's own "value not in list" error.
    api_workflow.use_installed_checkpoints(workflow, ObjectInfo(["other.bin"]), notes.append)
    assert workflow["1"]["inputs"]["ckpt_name"] == "facediffuser_sdm.bin" and len(notes) == 1


def started_pid(output: str) -> int:
    return int(re.search(r"started ComfyUI from .* \(pid (\d+)\)", output).group(1))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # 2.0 s here
@pytest.mark.parametrize("keep", [False, True])
def test_with_no_server_the_runner_starts_comfyui_and_stops_it_unless_kept(tmp_path, capsys, nothing_at_the_default_address, keep):
    root = fake_comfyui(tmp_path, "pack")
    args = runner.parse_args(["--comfyui", str(root), "--comfyui-args", "--lowvram --base-directory '/data/my comfy'",
                              *(["--keep-server"] if keep else [])])
    with own_comfyui.server_for(args) as url:
        assert http_api.comfyui_answers(url) and url != own_comfyui.DEFAULT_SERVER
    out = capsys.readouterr().out
    pid = started_pid(out)
    argv = json.loads((root / "argv.json").read_text())
    assert argv[:3] == ["--listen", "127.0.0.1", "--port"] and argv[-3:] == ["--lowvram", "--base-directory", "/data/my comfy"]
    if keep:
        assert http_api.comfyui_answers(url) and f"ComfyUI keeps running at {url} (pid {pid}" in out
        os.killpg(pid, signal.SIGTERM)
        return
    assert f"stopped the ComfyUI started for this job (pid {pid})" in out
    assert gone(pid) and not http_api.comfyui_answers(url)


@pytest.mark.slow  # 2.0 s here
@pytest.mark.parametrize("mode, message", [
    ("crash", r"exited with status 3 before answering; the end of its log .*\n.*boom: the fake ComfyUI cannot start"),
    ("no pack", r"has not loaded the Face-diffuser nodes \(is the pack in its custom_nodes folder\?\)"),
])
def test_a_comfyui_that_does_not_start_well_is_reported_and_stopped(tmp_path, capsys, nothing_at_the_default_address, mode, message):
    root = fake_comfyui(tmp_path, mode)
    args = runner.parse_args(["--comfyui", str(root)])
    with pytest.raises(http_api.RunError, match=message):
        with own_comfyui.server_for(args):
            pytest.fail("the job must not run")
    assert gone(started_pid(capsys.readouterr().out))


def test_with_no_server_and_no_comfyui_to_start_the_error_says_what_to_pass(tmp_path, capsys, nothing_at_the_default_address):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(CUSTOM_SAMPLING_WORKFLOW))
    assert runner.main([str(path), "--comfyui", str(tmp_path / "nowhere")]) == 1
    message = capsys.readouterr().err
    assert f"no ComfyUI server answers at {own_comfyui.DEFAULT_SERVER}, and none can be started" in message
    assert "is not a ComfyUI folder" in message and "--server" in message


# --- against a real ComfyUI server -------------------------------------------------------------------------


def test_runs_a_workflow_and_saves_its_images(server, tmp_path, capsys):
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 2, "color": 0x00FF00}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "runner_test"}},
    }
    assert runner.main([write(tmp_path, workflow), "--server", server.url, "--output", str(tmp_path / "out")]) == 0
    saved = sorted((tmp_path / "out").iterdir())
    assert len(saved) == 2, capsys.readouterr()
    for path in saved:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (16, 24, 3)
        assert (pixels == [0, 255, 0]).all()
    assert "saved" in capsys.readouterr().out


def test_uploaded_photo_reaches_load_image(server, tmp_path):
    photo = tmp_path / "face.png"
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
    Image.fromarray(original).save(photo)
    name = http_api.ComfyClient(server.url).upload_image(photo)
    assert (server.input_dir / name).is_file()
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "upload_test"}},
    }
    assert runner.main([write(tmp_path, workflow), "--server", server.url, "--output", str(tmp_path / "out")]) == 0
    (saved,) = (tmp_path / "out").iterdir()
    np.testing.assert_array_equal(np.asarray(Image.open(saved).convert("RGB")), original)


@pytest.mark.parametrize("with_a_valid_output, headline", [
    (False, "Prompt outputs failed validation"),
    # ComfyUI queues the outputs that pass validation and drops the others; the runner does not accept half a job.
    (True, "some of its outputs failed validation, so it was not run"),
])
def test_a_rejected_workflow_prints_comfyuis_validation_errors(server, tmp_path, capsys, with_a_valid_output, headline):
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 0, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "rejected"}},
    }
    if with_a_valid_output:
        workflow["3"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
        workflow["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "valid_half"}}
    assert runner.main([write(tmp_path, workflow), "--server", server.url, "--output", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert f"ComfyUI rejected the workflow: {headline}" in message
    assert "node 1 (EmptyImage): Value 0 smaller than min of 1: batch_size" in message
    assert not (tmp_path / "out").exists()


def test_a_node_that_fails_while_running_is_reported(server, tmp_path, capsys):
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 0.01}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "failing"}},
    }
    assert runner.main([write(tmp_path, workflow), "--server", server.url, "--output", str(tmp_path / "out")]) == 1
    assert "ComfyUI failed in node 2 (ImageScaleBy): RuntimeError" in capsys.readouterr().err


def test_waiting_is_bounded(server):
    # A job the server never finishes (here: one it never heard of) makes the runner give up at the deadline.
    client = http_api.ComfyClient(server.url)
    states = []
    with pytest.raises(http_api.RunError, match="gave up after 0.2 s: job no-such-job is still finishing"):
        client.wait("no-such-job", timeout_s=0.2, poll_s=0.05, report=states.append)
    assert states == ["finishing"]


@pytest.mark.slow  # 2.4 s here
@pytest.mark.parametrize("name, prompt", [
    ("facediffuser_single_subject", "a woman <|image|> reading in a cafe"),
    ("facediffuser_two_subjects", "a man <|image|> and a woman <|image|> at the beach"),
    ("facediffuser_custom_sampling", "a man <|image|> on a mountain"),
])
def test_runs_each_shipped_workflow_with_uploaded_faces_and_overrides(server, tmp_path, capsys, name, prompt):
    from PIL import Image

    import tiny_install

    tiny_install.install_models(server.models_dir)
    workflow = tiny_install.small_api_workflow(name)
    faces = prompt.count("<|image|>")
    photos = tiny_install.write_face_photos(tmp_path / "photos", names=tuple(f"{name}_{i}.png" for i in range(faces)))
    (prefix,) = [node["inputs"]["filename_prefix"] for node in workflow.values() if node["class_type"] == "SaveImage"]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(workflow))
    output = tmp_path / "out"
    code = runner.main([str(path), "--server", server.url, *(arg for photo in photos for arg in ("--face", str(photo))),
                        "--prompt", prompt, "--seed", "5", "--batch-size", "2", "--output", str(output), "--timeout", "300"])
    captured = capsys.readouterr()
    assert code == 0, captured.err + server.log_tail()
    generated = sorted(output.glob(f"{prefix}_0*.png"))
    assert len(generated) == 2 and all(Image.open(p).size == (64, 64) for p in generated)
    assert all((server.input_dir / photo.name).is_file() for photo in photos)
    assert "submitted to" in captured.out and "saved" in captured.out
    # ComfyUI's step progress, relayed from its websocket; plain lines, as capsys is no terminal.
    sampler = "SamplerCustomAdvanced" if name == "facediffuser_custom_sampling" else "FaceDiffuserSNFSampler"
    assert re.search(rf"^  node \d+ \({sampler}\): step 3/3, [\d:]+ elapsed$", captured.out, re.M), captured.out
    if name == "facediffuser_custom_sampling":
        # The saliency preview's pictures come back too: 4 panels per image of the batch.
        assert len([p for p in output.glob("*.png") if p not in generated and "temp" in p.name.lower()]) >= 8


def test_a_photo_without_a_face_is_named_by_its_file_in_the_error(server, tmp_path, capsys):
    """The node says 'image 1 of the batch'; the user gave files: the runner says which one."""
    import tiny_install

    tiny_install.install_models(server.models_dir)
    face, = tiny_install.write_face_photos(tmp_path / "photos", names=("with_a_face.png",))
    blank = tmp_path / "photos" / "wall.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(blank)
    path = tmp_path / "two.json"
    path.write_text(json.dumps(tiny_install.small_api_workflow("facediffuser_two_subjects")))
    code = runner.main([str(path), "--server", server.url, "--face", str(face), "--face", str(blank),
                        "--output", str(tmp_path / "out"), "--timeout", "300"])
    message = capsys.readouterr().err
    assert code == 1, message
    assert "no face found in image 1 of the batch" in message
    assert message.rstrip().endswith(f"(photo 1 is --face {blank})")


def test_previews_comfyui_reused_from_an_earlier_run_are_not_saved_again(server, tmp_path, capsys):
    """The same face twice on one server: the second run's face crops are the first run's (ComfyUI's cache); they
    are neither reported as saved nor copied again, while the new picture is."""
    import tiny_install

    tiny_install.install_models(server.models_dir)
    photo, = tiny_install.write_face_photos(tmp_path / "photos", names=("cached_face.png",))
    path = tmp_path / "single.json"
    path.write_text(json.dumps(tiny_install.small_api_workflow("facediffuser_single_subject")))
    output = tmp_path / "out"
    runs = []
    for seed in ("1", "2"):
        code = runner.main([str(path), "--server", server.url, "--face", str(photo), "--seed", seed, "--output", str(output),
                            "--timeout", "300"])
        runs.append(capsys.readouterr())
        assert code == 0, runs[-1].err + server.log_tail()
    first_saved = re.findall(r"^saved (.*)$", runs[0].out, re.M)
    previews = [name for name in first_saved if "temp" in Path(name).name]
    assert previews, runs[0].out  # the face crop of the Encode Reference Faces' preview
    second_saved = re.findall(r"^saved (.*)$", runs[1].out, re.M)
    assert len(second_saved) == 1 and "temp" not in Path(second_saved[0]).name and second_saved[0] not in first_saved
    assert re.search(r"^not saved again: 1 preview picture\(s\) of node\(s\) \d+, which ComfyUI reused", runs[1].out, re.M)
    assert sorted(output.iterdir()) == sorted(Path(name) for name in first_saved + second_saved)


# --- best of N ---------------------------------------------------------------------------------------------

IDENTITY_WORKFLOW = {
    **copy.deepcopy(SNF_WORKFLOW),
    "11": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0]}},
    "12": {"class_type": "FaceDiffuserIdentityScore", "inputs": {"references": ["4", 0], "images": ["11", 0], "recognition": "dlib", "keep_best": 0}},
    "13": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "best"}},
}


def picture(batch_index: int, score: float) -> dict:
    return {"batch_index": batch_index, "score": score, "subjects": []}


def test_best_of_n_finds_the_identity_node_and_the_save_image_of_its_pictures():
    workflow = copy.deepcopy(IDENTITY_WORKFLOW)
    assert best_of_n.identity_score_node(workflow) == "12"
    assert best_of_n.scored_pictures_saver(workflow, "12") == "13"  # not node 10, which saves another image
    assert api_workflow.current_value(workflow, "seed") == 0
    with pytest.raises(http_api.RunError, match="has no such node.*Add one Face-diffuser Identity Score"):
        best_of_n.identity_score_node(SNF_WORKFLOW)
    workflow["14"] = copy.deepcopy(workflow["12"])
    with pytest.raises(http_api.RunError, match=r"has 2 such nodes \(12, 14\)"):
        best_of_n.identity_score_node(workflow)
    del workflow["13"]
    with pytest.raises(http_api.RunError, match=r"no SaveImage node saves the pictures that node 12 .* comes from \['11', 0\]"):
        best_of_n.scored_pictures_saver(workflow, "12")


def test_pictures_are_ranked_by_score_then_seed_then_batch_order():
    candidates = [{"pictures": [picture(0, 0.5), picture(1, 0.9)]}, {"pictures": [picture(0, 0.9), picture(1, -1.0)]},
                  {"pictures": [picture(0, 0.7), picture(1, 0.5)]}]
    assert best_of_n.rank_pictures(candidates) == [(0, 1), (1, 0), (2, 0), (0, 0), (2, 1), (1, 1)]


class SeedsServer:
    """A client whose server fails the run of `failing_seed` and holds the others queued until asked for them."""

    server = "http://127.0.0.1:9"

    def __init__(self, failing_seed: int):
        self.failing_seed, self.seeds, self.cancelled = failing_seed, {}, []

    def submit(self, workflow, client_id):
        prompt_id = f"p{len(self.seeds)}"
        self.seeds[prompt_id] = api_workflow.current_value(workflow, "seed")
        return prompt_id

    def wait(self, prompt_id, timeout_s, report=print, tick=None):
        if self.seeds[prompt_id] == self.failing_seed:
            return {"status": {"status_str": "error", "completed": False, "messages": [
                ["execution_error", {"node_id": "8", "node_type": "FaceDiffuserSNFSampler", "exception_type": "ValueError",
                                     "exception_message": "boom"}]]}}
        return {"status": {"status_str": "success", "completed": True}, "outputs": {
            "12": {"facediffuser_identity": [picture(0, 0.5)]}, "13": {"images": [{"filename": f"{prompt_id}.png"}]}}}

    def cancel(self, prompt_id):
        self.cancelled.append(prompt_id)


def test_best_of_n_cancels_the_seeds_still_queued_when_one_fails(tmp_path):
    client = SeedsServer(failing_seed=11)
    args = runner.parse_args([write(tmp_path, IDENTITY_WORKFLOW), "--seed", "10", "--candidates", "4", "--output", str(tmp_path / "out")])
    with pytest.raises(http_api.RunError, match="seed 11: ComfyUI failed in node 8 .*boom"):
        headless.run_best_of_n(args, client)
    assert client.cancelled == ["p2", "p3"]  # seeds 12 and 13; seed 10 is done, 11 ended in its error


def test_candidates_imply_keeping_the_best_one():
    assert runner.parse_args(["wf.json", "--candidates", "4"]).keep_best == 1
    assert runner.parse_args(["wf.json", "--candidates", "4", "--keep-best", "2"]).keep_best == 2
    assert runner.parse_args(["wf.json"]).keep_best is None


def test_best_of_n_keeps_the_best_pictures_and_writes_every_seeds_scores(server, tmp_path, capsys):
    import tiny_install

    tiny_install.install_models(server.models_dir)
    workflow = tiny_install.small_api_workflow("facediffuser_single_subject")
    (encoder,) = [i for i, node in workflow.items() if node["class_type"] == "FaceDiffuserEncodeReferenceFaces"]
    (saver,) = [i for i, node in workflow.items() if node["class_type"] == "SaveImage"]
    workflow["100"] = {"class_type": "FaceDiffuserIdentityScore", "inputs": {
        "references": workflow[encoder]["inputs"]["images"], "images": workflow[saver]["inputs"]["images"],
        "face_analysis": workflow[encoder]["inputs"]["face_analysis"], "recognition": "insightface", "keep_best": 0}}
    photos = tiny_install.write_face_photos(tmp_path / "photos", names=("best_of_n.png",))
    output = tmp_path / "out"
    code = runner.main([write(tmp_path, workflow), "--server", server.url, "--face", str(photos[0]), "--seed", "5",
                        "--candidates", "3", "--keep-best", "2", "--batch-size", "2", "--output", str(output), "--timeout", "300"])
    captured = capsys.readouterr()
    assert code == 0, captured.err + server.log_tail()
    assert "submitted 3 job(s)" in captured.out and "seed 7: picture 0: score" in captured.out
    report = json.loads((output / "identity_scores.json").read_text())
    assert [c["seed"] for c in report["candidates"]] == [5, 6, 7] and report["identity_node"] == "100"
    for candidate in report["candidates"]:
        assert [p["batch_index"] for p in candidate["pictures"]] == [0, 1]
        for entry in candidate["pictures"]:
            assert {"score", "rank", "faces", "model", "threshold", "subjects", "kept_as"} <= set(entry)
            assert [s["subject"] for s in entry["subjects"]] == [0]
    # tiny random models paint no faces: every picture scores -1 and the ranking keeps seed and batch order
    assert [(k["rank"], k["seed"], k["batch_index"], k["score"]) for k in report["kept"]] == [(1, 5, 0, -1.0), (2, 5, 1, -1.0)]
    assert report["candidates"][0]["pictures"][1]["kept_as"] == "best02_seed-5_1.png"
    assert sorted(p.name for p in output.iterdir()) == ["best01_seed-5_0.png", "best02_seed-5_1.png", "identity_scores.json"]
    assert Image.open(output / "best01_seed-5_0.png").size == (64, 64)


# --- the README's spellings, CPU-only machines, Ctrl-C, inputs and outputs ------------------------------------


@pytest.mark.parametrize("value", ["--cpu", "--lowvram", "--cpu --base-directory /data/comfy"])
def test_comfyui_args_take_the_readmes_spelling(value):
    assert runner.parse_args(["--face", "me.jpg", "--comfyui-args", value]).comfyui_args == value
    assert runner.parse_args([f"--comfyui-args={value}"]).comfyui_args == value
    # every command line that starts ComfyUI takes the same spelling
    assert pack_scripts.load("facediffuser_batch").parse_args(["jobs.jsonl", "--ray", "--comfyui-args", value]).comfyui_args == value
    two_faces = ["--face", "a.jpg", "--face", "b.jpg"]
    assert pack_scripts.load("identity_benchmark").parse_args([*two_faces, "--comfyui-args", value]).comfyui_args == value


@pytest.mark.slow  # 2.0 s here
def test_on_a_cpu_only_torch_the_runner_starts_comfyui_with_cpu_and_says_so(tmp_path, capsys, nothing_at_the_default_address):
    import torch

    assert not torch.cuda.is_available()
    root = fake_comfyui(tmp_path, "pack")
    with own_comfyui.server_for(runner.parse_args(["--comfyui", str(root), "--comfyui-args", "--lowvram"])):
        pass
    argv = json.loads((root / "argv.json").read_text())
    assert argv[-2:] == ["--cpu", "--lowvram"]
    assert "has no GPU (a CPU-only build): starting ComfyUI with --cpu" in capsys.readouterr().out


def test_a_comfyui_that_needs_cpu_gets_a_hint_with_the_users_arguments_and_a_tail_from_a_line_start(
        tmp_path, capsys, nothing_at_the_default_address, monkeypatch):
    monkeypatch.setattr(own_comfyui, "torch_sees_a_gpu", lambda python=None: None)  # a torch whose devices cannot be told
    root = fake_comfyui(tmp_path, "no cuda")
    with pytest.raises(http_api.RunError) as raised:
        with own_comfyui.server_for(runner.parse_args(["--comfyui", str(root), "--comfyui-args", "--lowvram"])):
            pytest.fail("the job must not run")
    message = str(raised.value)
    tail = message.split("):\n", 1)[1]
    assert tail.startswith("log line ") and "Torch not compiled with CUDA enabled" in tail
    assert message.endswith('run again with --comfyui-args "--cpu --lowvram"')
    out = capsys.readouterr().out
    assert "had exited by itself (status 1)" in out and "stopped the ComfyUI" not in out


@pytest.mark.slow  # 2.0 s here
def test_a_comfyui_that_exits_during_the_job_is_not_said_to_be_stopped(tmp_path, capsys, nothing_at_the_default_address):
    root = fake_comfyui(tmp_path, "pack")
    with own_comfyui.server_for(runner.parse_args(["--comfyui", str(root)])):
        pid = started_pid(capsys.readouterr().out)
        os.killpg(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
            pass  # until it is a zombie, which only the runner's wait reaps
    out = capsys.readouterr().out
    assert f"(pid {pid}) had exited by itself" in out and "stopped the ComfyUI" not in out


def test_a_missing_face_photo_is_reported_before_anything_starts(tmp_path, capsys, nothing_at_the_default_address):
    root = fake_comfyui(tmp_path, "pack")
    assert runner.main(["--face", str(tmp_path / "me.jpg"), "--prompt", "a man <|image|>", "--comfyui", str(root)]) == 1
    assert f"--face: {tmp_path / 'me.jpg'} is not a file (no such file" in capsys.readouterr().err
    assert not (root / "argv.json").exists()  # no ComfyUI was started


def test_default_output_is_never_inside_the_pack(tmp_path, monkeypatch):
    root = fake_comfyui(tmp_path, "pack")
    monkeypatch.chdir(api_workflow.PACK_ROOT / "scripts")
    assert runner.parse_args(["--comfyui", str(root)]).output == root / "output"
    monkeypatch.chdir(tmp_path)
    assert runner.parse_args(["--comfyui", str(root)]).output == Path("facediffuser_output")


@pytest.mark.slow  # 2.8 s here
def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing_running(tmp_path):
    import subprocess
    import sys
    import time

    if http_api.comfyui_answers(http_api.DEFAULT_SERVER):
        pytest.skip(f"a ComfyUI already answers at {http_api.DEFAULT_SERVER}: the runner would use it instead of starting one")
    root = fake_comfyui(tmp_path, "slow")
    (tmp_path / "me.png").write_bytes(b"png")
    env = {**os.environ, "PYTHONPATH": str(pack_scripts.SCRIPTS_DIR)}
    runner_process = subprocess.Popen(
        [sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_run.py"), "--face", "me.png", "--prompt", "a man <|image|>",
         "--comfyui", str(root), "--timeout", "60"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (root / "argv.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    runner_process.send_signal(signal.SIGINT)
    out, err = runner_process.communicate(timeout=60)
    assert runner_process.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("interrupted: nothing of this run is left running") and "run the same command again" in line
    assert f"stopped the ComfyUI started for this job (pid {started_pid(out)})" in out and gone(started_pid(out))


def test_progress_is_a_bar_on_a_terminal_and_lines_when_piped():
    import io

    from facediffuser_client.progress import ProgressDisplay

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    workflow = {"8": {"class_type": "FaceDiffuserSNFSampler", "inputs": {}}}
    for stream in (io.StringIO(), Terminal()):
        now = [0.0]
        display = ProgressDisplay(workflow, stream, clock=lambda: now[0])
        display.state("running")
        for step in range(1, 51):
            now[0] += 2.0
            display.step((step, 50, "8"))
        display.state("finishing")
        display.close()
        text = stream.getvalue()
        if stream.isatty():
            assert text.count("\r") == 50
            assert re.search(r"\r  node 8 \(FaceDiffuserSNFSampler\) \[#{30}\] 50/50, 1:40 elapsed *\n  finishing\n", text)
        else:
            lines = text.splitlines()
            assert lines[0] == "  running" and lines[-1] == "  finishing" and "\r" not in text
            assert lines[1:-1] == [f"  node 8 (FaceDiffuserSNFSampler): step {step}/50, {timing}" for step, timing in (
                (1, "0:02 elapsed"), (5, "0:10 elapsed, about 1:30 left"), (10, "0:20 elapsed, about 1:20 left"),
                (15, "0:30 elapsed, about 1:10 left"), (20, "0:40 elapsed, about 1:00 left"), (25, "0:50 elapsed, about 0:50 left"),
                (30, "1:00 elapsed, about 0:40 left"), (35, "1:10 elapsed, about 0:30 left"), (40, "1:20 elapsed, about 0:20 left"),
                (45, "1:30 elapsed, about 0:10 left"), (50, "1:40 elapsed"))]


@pytest.mark.slow  # 6.8 s here
def test_the_readmes_small_first_picture_for_a_cpu_runs_as_printed(server, tmp_path, monkeypatch, capsys):
    """The README's CPU command, words as printed, with the shipped workflow as shipped but for what the command sets;
    the default address is the test server's, where the tiny models stand in for the real ones."""
    import tiny_install
    from documented_commands import arguments, runner_small_picture_commands

    tiny_install.install_models(server.models_dir)
    monkeypatch.setattr(own_comfyui, "DEFAULT_SERVER", server.url)
    monkeypatch.chdir(tmp_path)
    (command,) = runner_small_picture_commands()
    tiny_install.write_face_photos(tmp_path, names=("me.jpg",))
    assert runner.main(arguments(command)) == 0, capsys.readouterr().err + server.log_tail()
    out = capsys.readouterr().out
    assert re.search(r"^  node \d+ \(FaceDiffuserSNFSampler\): step 20/20, [\d:]+ elapsed$", out, re.M), out
    (picture,) = (tmp_path / "facediffuser_output").glob("facediffuser_0*.png")
    assert Image.open(picture).size == (256, 256)


def test_the_readmes_runner_commands_with_a_workflow_run_as_printed(server, tmp_path, monkeypatch, capsys):
    """Each runner command of README.md that names a workflow file, with its words as printed, in a folder that holds
    the pack's workflows as the pack's folder does. Substituted: the server it names, or the default address it uses
    without one, becomes the test server's; the shipped workflows are at the tiny models' size (64 px, 3 steps)."""
    import tiny_install
    from documented_commands import arguments, runner_workflow_commands

    tiny_install.install_models(server.models_dir)
    monkeypatch.setattr(own_comfyui, "DEFAULT_SERVER", server.url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workflows" / "api").mkdir(parents=True)
    for name in ("facediffuser_single_subject", "facediffuser_two_subjects"):
        (tmp_path / "workflows" / "api" / f"{name}.json").write_text(json.dumps(tiny_install.small_api_workflow(name)))
    commands = runner_workflow_commands()
    assert len(commands) == 2
    for command in commands:
        tiny_install.write_face_photos(tmp_path, names=tuple(re.findall(r"--face (\S+)", command)))
        typed = re.sub(r"--server \S+", f"--server {server.url}", command)
        assert runner.main(arguments(typed)) == 0, capsys.readouterr().err + server.log_tail()
        output = arguments(command)[arguments(command).index("--output") + 1] if "--output" in command else "facediffuser_output"
        assert list((tmp_path / output).glob("*.png")), (command, capsys.readouterr().out)
