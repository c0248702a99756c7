"""The runner's --regions and --boxes (plain tier: which workflow runs, what is set on it, every mismatch an error before
anything starts), and what the pack's nodes log during a run shown in the runner's output: the log records of a job
picked from ComfyUI's log stream (plain tier), and a real ComfyUI server on 127.0.0.1 whose auto-regions run finds no
face (needs COMFYUI_PATH)."""

from __future__ import annotations

import copy
import json
import re

import pytest

import comfy_server
import pack_scripts
import workflow_builder
from facediffuser_client import headless, http_api, regions, server_log
from runner_runs import fake_comfyui, write

runner = pack_scripts.load("facediffuser_run")

TWO_PEOPLE = "a photo of a man <|image|> and a woman <|image|> on a beach"
REGIONS_WORKFLOW = workflow_builder.API_DIR / "facediffuser_two_subjects_regions.json"
AUTO_WORKFLOW = workflow_builder.API_DIR / "facediffuser_two_subjects_auto_regions.json"
PLAIN_WORKFLOW = workflow_builder.API_DIR / "facediffuser_two_subjects.json"


def configured(*argv: str) -> dict:
    return headless.configured_workflow(runner.parse_args(list(argv)))


def node(workflow: dict, class_type: str) -> dict:
    (found,) = [node for node in workflow.values() if node["class_type"] == class_type]
    return found["inputs"]


def two_faces(tmp_path) -> list[str]:
    for name in ("man.png", "woman.png"):
        (tmp_path / name).write_bytes(b"png")
    return ["--face", str(tmp_path / "man.png"), "--face", str(tmp_path / "woman.png")]


# --- --regions: the workflow and what is set on it ------------------------------------------------------------


@pytest.mark.parametrize("layout, boxes, expected_boxes", [
    ("halves", None, "0 0 0.5 1; 0.5 0 1 1"),  # the shipped workflow's own boxes, unused by halves, stay
    ("boxes", "0 0 0.45 1; 0.55 0.1 1 1", "0 0 0.45 1; 0.55 0.1 1 1"),
])
def test_a_layout_without_a_workflow_runs_the_shipped_regions_workflow_with_that_layout(tmp_path, layout, boxes, expected_boxes):
    argv = [*two_faces(tmp_path), "--prompt", TWO_PEOPLE, "--regions", layout, *(["--boxes", boxes] if boxes else [])]
    args = runner.parse_args(argv)
    assert headless.workflow_file(args) == REGIONS_WORKFLOW
    layout_inputs = node(headless.configured_workflow(args), "FaceDiffuserRegionLayout")
    assert layout_inputs == {"layout": layout, "subjects": 2, "width": 512, "height": 512, "boxes": expected_boxes}


def test_auto_without_a_workflow_runs_the_shipped_auto_regions_workflow(tmp_path):
    args = runner.parse_args([*two_faces(tmp_path), "--prompt", TWO_PEOPLE, "--regions", "auto"])
    assert headless.workflow_file(args) == AUTO_WORKFLOW
    workflow = headless.configured_workflow(args)
    auto = [node_id for node_id, node in workflow.items() if node["class_type"] == "FaceDiffuserAutoRegions"]
    assert node(workflow, "FaceDiffuserSNFSampler")["auto_regions"] == [auto[0], 0]
    # without --regions the runner's choice is what it was
    assert headless.workflow_file(runner.parse_args([*two_faces(tmp_path), "--prompt", TWO_PEOPLE])) == PLAIN_WORKFLOW


def test_a_layout_on_a_given_workflow_follows_its_picture_size_and_the_prompts_markers(tmp_path):
    workflow = json.loads(REGIONS_WORKFLOW.read_text())
    node(workflow, "EmptyLatentImage").update(width=768, height=512)
    node(workflow, "FaceDiffuserSubjectPrompt")["text"] = "a man <|image|>, a woman <|image|> and a child <|image|>"
    layout_inputs = node(configured(write(tmp_path, workflow), "--regions", "thirds"), "FaceDiffuserRegionLayout")
    assert (layout_inputs["layout"], layout_inputs["subjects"], layout_inputs["width"], layout_inputs["height"]) == ("thirds", 3, 768, 512)


@pytest.mark.parametrize("argv, message", [
    (["--regions", "thirds"], r"--regions thirds for 2 people \(--face given 2 time\(s\)\): 'thirds' makes 3 regions but 2 "
                              r"subject\(s\) were asked for: use 'halves' for two people"),
    (["--regions", "boxes", "--boxes", "0 0 1 1"], r"--regions boxes --boxes \"0 0 1 1\" for 2 people .*'boxes' lists 1 box\(es\)"),
    (["--regions", "boxes", "--boxes", "0 0 0.5 1; 0.5 0 2 1"], r"box 2 \('0.5 0 2 1'\) must have 0 <= x0 < x1 <= 1"),
    (["--regions", "boxes", "--boxes", "left; right"], r"box 1 \('left'\) is not four numbers x0 y0 x1 y1"),
    (["--regions", "boxes"], r"--regions boxes: give one box per person with --boxes, .* e.g. --boxes \"0 0 0.5 1; 0.5 0 1 1\""),
    (["--regions", "halves", "--boxes", "0 0 0.5 1; 0.5 0 1 1"], r"--boxes gives the boxes of --regions boxes"),
])
def test_a_layout_that_does_not_fit_is_an_error_before_anything_starts(tmp_path, capsys, nothing_at_the_default_address, argv, message):
    root = fake_comfyui(tmp_path, "pack")
    assert runner.main([*two_faces(tmp_path), "--prompt", TWO_PEOPLE, "--comfyui", str(root), *argv]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (root / "argv.json").exists()  # no ComfyUI was started


@pytest.mark.parametrize("faces, message", [
    (0, r"--regions halves without a workflow file .* but --face is given 0 time\(s\): give --face twice$"),
    (1, r"--regions halves without a workflow file runs the shipped two-person workflow facediffuser_two_subjects_regions, but "
        r"--face is given 1 time\(s\): regions keep several people apart: for one person leave --regions out"),
    (3, r"--face is given 3 time\(s\): give --face twice, or pass a workflow of your own that loads 3 reference photos and has a "
        r"Face-diffuser Region Layout node"),
])
def test_without_a_workflow_regions_are_for_two_people(tmp_path, faces, message):
    argv = [arg for index in range(faces) for arg in ("--face", str(tmp_path / f"{index}.png"))]
    with pytest.raises(http_api.RunError, match=message):
        configured(*argv, "--regions", "halves")


def test_a_workflow_with_nothing_to_take_the_layout_is_an_error_naming_the_workflow_that_has():
    with pytest.raises(http_api.RunError, match=r"--regions halves: the workflow has no Face-diffuser Region Layout node "
                                                r"\(FaceDiffuserRegionLayout\) to take it\. Use workflows/api/facediffuser_two_subjects_regions.json"):
        configured(str(PLAIN_WORKFLOW), "--regions", "halves")
    with pytest.raises(http_api.RunError, match=r"--regions auto: the workflow has no Face-diffuser Auto Regions node \(FaceDiffuserAutoRegions\) to "
                                                r"take it; its regions come from Face-diffuser Region Layout \(node \d+\)\. Use "
                                                r"workflows/api/facediffuser_two_subjects_auto_regions.json, or connect a Face-diffuser Auto Regions "
                                                r"to the sampler's 'auto_regions'"):
        configured(str(REGIONS_WORKFLOW), "--regions", "auto")
    with pytest.raises(http_api.RunError, match=r"--regions boxes: the workflow has no Face-diffuser Region Layout .* its regions come "
                                                r"from Face-diffuser Auto Regions"):
        configured(str(AUTO_WORKFLOW), "--regions", "boxes", "--boxes", "0 0 0.5 1; 0.5 0 1 1")


def test_a_layout_node_connected_to_nothing_or_beside_auto_regions_is_an_error(tmp_path):
    workflow = json.loads(REGIONS_WORKFLOW.read_text())
    (layout_id,) = [node_id for node_id, n in workflow.items() if n["class_type"] == "FaceDiffuserRegionLayout"]
    unwired = copy.deepcopy(workflow)
    del node(unwired, "FaceDiffuserSNFSampler")["regions"]
    with pytest.raises(http_api.RunError, match=rf"Face-diffuser Region Layout \(node {layout_id}\) is connected to nothing, so ComfyUI "
                                                r"would not run it: connect its output to the sampler's regions"):
        configured(write(tmp_path, unwired), "--regions", "halves")
    both = json.loads(AUTO_WORKFLOW.read_text())
    both["100"] = copy.deepcopy(workflow[layout_id])
    node(both, "FaceDiffuserSNFSampler")["regions"] = ["100", 0]
    with pytest.raises(http_api.RunError, match=r"--regions auto: the workflow also takes regions from Face-diffuser Region Layout "
                                                r"\(node 100\); a sampler takes one or the other"):
        configured(write(tmp_path, both), "--regions", "auto")


def test_a_wired_layout_input_is_not_cut(tmp_path):
    workflow = json.loads(REGIONS_WORKFLOW.read_text())
    (latent_id,) = [node_id for node_id, n in workflow.items() if n["class_type"] == "EmptyLatentImage"]
    node(workflow, "FaceDiffuserRegionLayout")["subjects"] = [latent_id, 0]
    with pytest.raises(http_api.RunError, match=rf"--regions halves: input 'subjects' of node \d+ \(FaceDiffuserRegionLayout\) is wired "
                                                rf"to node {latent_id} \(EmptyLatentImage\); unwire it"):
        configured(write(tmp_path, workflow), "--regions", "halves", "--prompt", TWO_PEOPLE)


def test_without_faces_the_people_are_the_prompts_markers(tmp_path):
    with pytest.raises(http_api.RunError, match=r"for 3 people \(the prompt has 3 <\|image\|> marker\(s\)\)"):
        configured(str(REGIONS_WORKFLOW), "--regions", "halves", "--prompt", "a <|image|>, b <|image|> and c <|image|>")
    assert node(configured(str(REGIONS_WORKFLOW), "--regions", "halves"), "FaceDiffuserRegionLayout")["subjects"] == 2


# --- the pack's log records of a job ----------------------------------------------------------------------------


def unconnected() -> server_log.JobLog:
    """A JobLog of a port where nothing listens, fed messages by hand."""
    return server_log.JobLog(f"http://127.0.0.1:{comfy_server.free_port()}", "client")


def logs(*texts: str) -> dict:
    return {"type": "logs", "data": {"entries": [{"t": "2026-01-01T00:00:00", "m": text} for text in texts], "size": None}}


def test_a_jobs_records_are_the_pack_lines_written_while_it_ran():
    stream = unconnected()
    warning = "Face-diffuser SNF Sampler: auto_regions found 0 face(s) for 2 <|image|> marker(s), too few"
    for message in [
        logs(f"{warning} (before the job)\n"),
        {"type": "execution_start", "data": {"prompt_id": "other"}},  # another job of this client
        logs(f"{warning} (the other job)\n"),
        {"type": "execution_success", "data": {"prompt_id": "other"}},
        {"type": "execution_start", "data": {"prompt_id": "job"}},
        logs("got prompt\n", f"{warning}\n", "\x1b[1m\x1b[33m[WARNING]\x1b[0m Face-diffuser Auto Regions: in 0.33's colours\n",
             "[INFO] Face-diffuser Identity Score: a table\n| subject | score |\n", "100%|####| 3/3\r", "Prompt executed in 1 s\n"),
        {"type": "progress", "data": {"prompt_id": "job", "value": 1, "max": 3, "node": "14"}},
        {"type": "execution_success", "data": {"prompt_id": "job"}},
        logs(f"{warning} (after the job)\n"),
    ]:
        stream.handle(message)
    assert stream.take("job") == [warning, "[WARNING] Face-diffuser Auto Regions: in 0.33's colours",
                                  "[INFO] Face-diffuser Identity Score: a table\n| subject | score |"]
    assert stream.take("job") == [] and stream.take("other") == [f"{warning} (the other job)"]
    assert stream.progress("job") == (1, 3, "14")
    shown = []
    server_log.show(["Face-diffuser Identity Score: a table\n| subject | score |"], shown.append)
    assert shown == ["ComfyUI log: Face-diffuser Identity Score: a table", "             | subject | score |"]


def test_a_server_without_a_websocket_is_said_to_show_no_log(capsys):
    listener = unconnected()
    assert listener.unavailable == "its websocket could not be opened"
    listener.wait_for_end("job", timeout_s=60)  # returns at once: nothing can come
    headless.say_if_unavailable(listener)
    assert "ComfyUI's log cannot be shown here (its websocket could not be opened)" in capsys.readouterr().out


# --- against a real ComfyUI server ---------------------------------------------------------------------------


@pytest.mark.slow  # 2.6 s here
def test_an_auto_regions_run_that_finds_no_face_says_so_in_the_runners_output(server, tmp_path, capsys):
    """The shipped auto-regions workflow on the tiny models, whose random pictures hold no face for the detector: the
    run goes on without regions and exits 0, and the warning the sampler logs reaches the runner's output (it was in
    the server's log only), also from a server the runner did not start."""
    import tiny_install

    tiny_install.install_models(server.models_dir)
    photos = tiny_install.write_face_photos(tmp_path / "photos", names=("auto_1.png", "auto_2.png"))
    workflow = tiny_install.small_api_workflow(AUTO_WORKFLOW.stem)
    code = runner.main([write(tmp_path, workflow), "--server", server.url, "--face", str(photos[0]), "--face", str(photos[1]),
                        "--prompt", TWO_PEOPLE, "--output", str(tmp_path / "out"), "--timeout", "300"])
    out = capsys.readouterr().out
    assert code == 0, out + server.log_tail()
    warning = ("Face-diffuser SNF Sampler: auto_regions found 0 face(s) for 2 <|image|> marker(s), too few to give every "
               "subject a region: sampling goes on without regions (the paper's behaviour)")
    assert warning in server.log_tail(100000)
    assert re.search(r"^  ComfyUI log: (\[WARNING\] )?" + re.escape(warning) + "$", out, re.M), out
    # What the pack logs at INFO comes too; ComfyUI's own lines do not.
    assert re.search(r"^  ComfyUI log: (\[INFO\] )?Face-diffuser Encode Reference Faces: image 0: 1 face\(s\) found", out, re.M), out
    assert "got prompt" not in out and "Prompt executed" not in out
    assert list((tmp_path / "out").glob("facediffuser_two_auto_regions_*.png"))


def test_the_readmes_regions_commands_run_as_printed(server, tmp_path, monkeypatch, capsys):
    """Each --regions command of the README and docs/ with its words as printed, from a folder outside the pack. Substituted: the
    default address it uses becomes the test server's, and the shipped workflows it runs are at the tiny models' size
    (64 px, 3 steps); the photos are the test's two faces under the names the command gives."""
    import tiny_install
    from facediffuser_client import own_comfyui
    from documented_commands import DOCUMENTS, arguments, runner_regions_commands

    tiny_install.install_models(server.models_dir)
    monkeypatch.setattr(own_comfyui, "DEFAULT_SERVER", server.url)
    monkeypatch.setattr(regions, "PACK_ROOT", tmp_path / "pack")
    (tmp_path / "pack" / "workflows" / "api").mkdir(parents=True)
    for path in (REGIONS_WORKFLOW, AUTO_WORKFLOW):
        (tmp_path / "pack" / "workflows" / "api" / path.name).write_text(json.dumps(tiny_install.small_api_workflow(path.stem)))
    monkeypatch.chdir(tmp_path)
    commands = runner_regions_commands()
    assert sorted(arguments(command)[arguments(command).index("--regions") + 1] for command in commands) == ["auto", "boxes", "halves"]
    for command in commands:
        tiny_install.write_face_photos(tmp_path, names=tuple(re.findall(r"--face (\S+)", command)))
        assert runner.main(arguments(command)) == 0, capsys.readouterr().err + server.log_tail()
        out = capsys.readouterr().out
        layout = arguments(command)[arguments(command).index("--regions") + 1]
        prefix = "facediffuser_two_auto_regions" if layout == "auto" else "facediffuser_two_regions"
        assert re.search(rf"^saved facediffuser_output/{prefix}_\d+_\.png$", out, re.M), out
        if layout == "auto":  # tiny random models paint no face: the warning as the README shows it
            (shown,) = [line.strip() for document in DOCUMENTS for line in document.read_text(encoding="utf-8").splitlines()
                        if line.startswith("    ComfyUI log: ")]
            on_this_comfyui = shown if "[WARNING]" in out else shown.replace("[WARNING] ", "")  # 0.17 writes no level
            assert re.search(rf"^  {re.escape(on_this_comfyui)}$", out, re.M), out
