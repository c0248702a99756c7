"""scripts/facediffuser_batch.py: the jobs file and the manifest (plain tier), and whole batches against two
real ComfyUI servers on loopback ports with the tiny models (ComfyUI tier): runs spread over both servers,
a server killed mid-run, the client stopped and resumed, a bad photo failing alone, and a load test of a few
hundred tiny runs in which every run must end exactly once."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_harness
import comfy_server
import pack_scripts

batch = pack_scripts.load("facediffuser_batch")
runner = pack_scripts.load("facediffuser_run")
SCRIPT = pack_scripts.SCRIPTS_DIR / "facediffuser_batch.py"
EXAMPLE = pack_scripts.SCRIPTS_DIR.parent / "workflows" / "jobs_example.jsonl"


TINY_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tiny"}},
}


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def photo(path: Path, face: bool = True) -> Path:
    """The tests' astronaut portrait, or a blank grey picture in which no detector finds a face."""
    import tiny_install

    if face:
        (made,) = tiny_install.write_face_photos(path.parent, names=(path.name,))
        return made
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(path)
    return path


# --- the jobs file (plain tier) ----------------------------------------------------------------------------


def test_the_example_jobs_file_prepares_every_job(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    shutil.copytree(EXAMPLE.parent / "api", tmp_path / "api")
    for line in EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            for face in json.loads(line).get("faces", []):
                (tmp_path / face).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / face).write_bytes(b"photo " + face.encode())
    jobs = batch.load_jobs(tmp_path / EXAMPLE.name)
    assert [job.problem for job in jobs] == [None] * len(jobs)
    assert all(job.workflow and job.seeds for job in jobs)


def test_seeds_counts_ids_and_overrides(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    jobs = batch.load_jobs(write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "anna", "faces": ["a.png"], "prompt": "a woman <|image|>", "seeds": [5, 9], "steps": 20, "cfg": 4.5},
        {"faces": ["a.png"], "prompt": "a woman <|image|> skiing", "count": 3, "seed": 100},
        {"faces": ["a.png"], "prompt": "a woman <|image|> sailing"},
    ]))
    anna, counted, plain = jobs
    assert anna.id == "anna" and anna.run_keys() == ["seed-5", "seed-9"]
    sampler = next(node for node in anna.workflow.values() if node["class_type"] == "FaceDiffuserSNFSampler")
    assert sampler["inputs"]["steps"] == 20 and sampler["inputs"]["cfg"] == 4.5
    assert counted.seeds == [100, 101, 102] and re.fullmatch(r"job-[0-9a-f]{10}", counted.id)
    assert plain.run_keys() == ["seed-workflow"]  # the workflow's own seed
    # The derived id depends on the line's content only, not on its place in the file.
    again = batch.load_jobs(write_jobs(tmp_path / "reordered.jsonl", [plain.spec, counted.spec]))
    assert [job.id for job in again] == [plain.id, counted.id]


@pytest.mark.parametrize("spec, problem", [
    ({"faces": ["a.png"], "prompt": "x <|image|>", "colour": 1}, "unknown key(s) colour"),
    ({"faces": ["a.png", "a.png"], "prompt": "x <|image|>", "workflow": "wf.json"}, '"faces" lists 2 photo(s) but the workflow loads 1'),
    ({"faces": ["missing.png"]}, "cannot read the photo"),
    ({"faces": ["a.png"], "seeds": [1, 1]}, '"seeds" lists a seed twice'),
    ({"faces": ["a.png"], "seeds": [1], "count": 2}, 'give either "seeds" or "count"'),
    ({"faces": ["a.png"], "count": 0}, '"count" must be an integer of 1 or more'),
    ({"faces": ["a.png"], "batch_size": 2, "workflow": "no_latent.json"}, "--batch-size: the workflow has no EmptyLatentImage"),
    ({"faces": ["a.png", "a.png", "a.png"]}, "without a workflow file the runner uses the shipped workflow for one or two people"),
    ({"id": "a b", "faces": ["a.png"]}, '"id" \'a b\' must be letters, digits'),
])
def test_a_job_that_cannot_run_carries_its_problem(tmp_path, spec, problem):
    (tmp_path / "a.png").write_bytes(b"a")
    shipped = runner.load_api_workflow(runner.shipped_workflow(1))
    (tmp_path / "wf.json").write_text(json.dumps(shipped))
    (tmp_path / "no_latent.json").write_text(json.dumps({k: v for k, v in shipped.items() if v["class_type"] != "EmptyLatentImage"}))
    (job,) = batch.load_jobs(write_jobs(tmp_path / "jobs.jsonl", [spec]))
    assert problem in job.problem and job.seeds


def test_a_broken_jobs_file_is_refused_whole(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(batch.JobsFileError, match=r"line 2: not a JSON object"):
        batch.load_jobs(path)
    path.write_text('{"id": "a"}\n# a comment\n\n{"id": "a", "count": 2}\n')
    with pytest.raises(batch.JobsFileError, match=r"lines 1 and 4: both are job 'a'"):
        batch.load_jobs(path)


def test_the_manifest_is_replaced_whole_and_failed_runs_come_back_on_request(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "faces": ["a.png"], "seeds": [1, 2]}])
    jobs = batch.load_jobs(jobs_file)
    manifest = batch.Manifest(tmp_path, jobs_file)
    manifest.add_jobs(jobs, retry_failed=False)
    manifest.run("a", "seed-1").update(state=batch.FAILED, error="boom", attempts=3)
    manifest.save()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    reread = batch.Manifest(tmp_path, jobs_file)
    reread.add_jobs(jobs, retry_failed=False)
    assert reread.run("a", "seed-1")["state"] == batch.FAILED
    reread.add_jobs(jobs, retry_failed=True)
    assert reread.run("a", "seed-1")["state"] == batch.PENDING and reread.run("a", "seed-1")["attempts"] == 0


def test_which_failures_another_server_may_not_have():
    def entry(event, data):
        return {"status": {"status_str": "error", "messages": [["execution_start", {}], [event, data]]}}

    assert batch.transient_failure(entry("execution_interrupted", {"node_id": "3"}))
    assert batch.transient_failure(entry("execution_error", {"exception_type": "torch.OutOfMemoryError"}))
    assert not batch.transient_failure(entry("execution_error", {"exception_type": "ValueError"}))


def test_without_any_server_the_batch_gives_up_in_time_and_keeps_its_runs(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_WORKFLOW))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "workflow": "tiny.json"}])
    closed = f"http://127.0.0.1:{comfy_server.free_port()}"
    code, out, err = finish(start_batch(jobs_file, [closed], "--give-up-after", "1"), timeout=60)
    assert code == 3 and "no server has answered for 1 s" in err and "Run the same command again to resume" in err
    assert f"server  {closed} stopped answering" in out
    assert all_runs(manifest_of(jobs_file))[("a", "seed-workflow")]["state"] == batch.PENDING


# --- against two real ComfyUI servers ----------------------------------------------------------------------


@contextlib.contextmanager
def servers(tmp_path_factory, count: int = 2):
    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    import tiny_install

    with contextlib.ExitStack() as stack:
        running = [stack.enter_context(comfy_server.running_server(tmp_path_factory.mktemp(f"comfyui{i}"))) for i in range(count)]
        for server in running:
            tiny_install.install_models(server.models_dir)
        yield running


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    with servers(tmp_path_factory) as running:
        yield running


def face_workflow(folder: Path) -> Path:
    """The shipped single-subject workflow at the tiny models' size: seconds per run on a CPU."""
    import tiny_install

    path = folder / "tiny_single_subject.json"
    path.write_text(json.dumps(tiny_install.small_api_workflow("facediffuser_single_subject")))
    return path


def start_batch(jobs_file: Path, urls, *options: str) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), str(jobs_file), *(a for url in urls for a in ("--server", url)),
               "--poll", "0.05", "--progress-every", "1", *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def manifest_of(jobs_file: Path) -> dict:
    return json.loads((jobs_file.with_name(f"{jobs_file.stem}_run") / "manifest.json").read_text())


def all_runs(manifest: dict) -> dict:
    return {(job_id, key): run for job_id, job in manifest["jobs"].items() for key, run in job["runs"].items()}


def wait_for(condition, timeout: float = 300, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def history_ids(server) -> set[str]:
    return set(runner.ComfyClient(server.url).get_json("/history"))


def assert_each_run_done_once(jobs_file: Path, manifest: dict, images_per_run: int) -> None:
    """Every run done, with its own folder holding exactly its pictures, and nothing else in the outputs."""
    run_dir = jobs_file.with_name(f"{jobs_file.stem}_run")
    runs = all_runs(manifest)
    assert {run["state"] for run in runs.values()} == {batch.DONE}, {k: r["state"] for k, r in runs.items() if r["state"] != batch.DONE}
    folders = sorted(p for p in (run_dir / "outputs").glob("*/*"))
    assert [p.relative_to(run_dir / "outputs").as_posix() for p in folders] == sorted(f"{j}/{k}" for j, k in runs)
    for (job_id, key), run in runs.items():
        files = sorted(p.name for p in (run_dir / "outputs" / job_id / key).iterdir())
        assert len(files) == images_per_run and sorted(Path(f).name for f in run["files"]) == files


def test_jobs_spread_over_both_servers_photos_go_once_and_bad_jobs_fail_alone(two_servers, tmp_path):
    workflow = face_workflow(tmp_path)
    me = photo(tmp_path / "photos" / "me.png")
    photo(tmp_path / "photos" / "blank.png", face=False)
    good = [{"id": f"me-{i}", "workflow": workflow.name, "faces": ["photos/me.png"], "prompt": f"a photo of a woman <|image|> {place}",
             "count": 2, "seed": 10 * i} for i, place in enumerate(["in a cafe", "on a beach", "in a forest"])]
    bad_photo = {"id": "blank", "workflow": workflow.name, "faces": ["photos/blank.png"], "prompt": "a woman <|image|>"}
    invalid = {"id": "zero-steps", "workflow": workflow.name, "faces": ["photos/me.png"], "prompt": "a woman <|image|>", "steps": 0}
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [*good, bad_photo, invalid])
    code, out, err = finish(start_batch(jobs_file, [s.url for s in two_servers]))
    assert code == 1, out + err  # some runs failed
    manifest = manifest_of(jobs_file)
    runs = all_runs(manifest)
    assert {k: r["state"] for k, r in runs.items()} == {**{(f"me-{i}", f"seed-{10 * i + s}"): batch.DONE for i in range(3) for s in (0, 1)},
                                                      ("blank", "seed-workflow"): batch.FAILED, ("zero-steps", "seed-workflow"): batch.FAILED}
    assert {run["done_on"] for run in runs.values() if run["state"] == batch.DONE} == {s.url for s in two_servers}
    blank = runs[("blank", "seed-workflow")]["error"]
    assert "ComfyUI failed in node" in blank and "FaceDiffuserEncodeReferenceFaces" in blank and "no face" in blank
    rejected = runs[("zero-steps", "seed-workflow")]["error"]
    assert "ComfyUI rejected the workflow" in rejected and "(FaceDiffuserSNFSampler): Value 0 smaller than min of 1: steps" in rejected
    # Each photo went to each server once, whatever the number of runs using it.
    for server in two_servers:
        uploads = re.findall(rf"^upload  (\S+) to {re.escape(server.url)} as ", out, re.M)
        assert str(me) in uploads and len(uploads) == len(set(uploads)), out
    assert re.search(r"\d+ done, \d+ failed, \d+ pending of 8 runs; in flight: ", out)  # the progress line
    assert re.search(r"^me-0 +2/2 +0 +\d+", out, re.M) and re.search(r"^blank +0/1 +1 +0 +ComfyUI failed in node", out, re.M)
    assert me.is_file()


def test_a_server_killed_mid_run_loses_nothing_and_duplicates_nothing(tmp_path_factory, tmp_path):
    with servers(tmp_path_factory) as (steady, doomed):
        workflow = face_workflow(tmp_path)
        photo(tmp_path / "me.png")
        jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "me", "workflow": workflow.name, "faces": ["me.png"],
                                                          "prompt": "a woman <|image|> in a garden", "count": 8}])
        process = start_batch(jobs_file, [steady.url, doomed.url], "--max-in-flight", "1")
        on_doomed = lambda: any(r["state"] == batch.RUNNING and r["server"] == doomed.url for r in all_runs(manifest_of(jobs_file)).values())
        wait_for(lambda: on_doomed() and sum(r["state"] == batch.DONE for r in all_runs(manifest_of(jobs_file)).values()) >= 1,
                 what="a run on the second server after a first run was done")
        doomed.process.kill()
        code, out, err = finish(process)
        assert code == 0, out + err
        manifest = manifest_of(jobs_file)
        assert_each_run_done_once(jobs_file, manifest, images_per_run=2)  # the picture and the face crop
        retried = [r for r in all_runs(manifest).values() if r["errors"]]
        assert retried and all("stopped answering" in r["errors"][0] or "gone" in r["errors"][0] for r in retried)
        assert all(r["done_on"] == steady.url for r in retried)
        assert f"server  {doomed.url} stopped answering" in out


def test_a_stopped_client_resumes_and_reattaches_to_its_runs(two_servers, tmp_path):
    workflow = face_workflow(tmp_path)
    photo(tmp_path / "me.png")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"job{i}", "workflow": workflow.name, "faces": ["me.png"],
                                                      "prompt": f"a woman <|image|> number {i}", "count": 2} for i in range(4)])
    before = set().union(*(history_ids(s) for s in two_servers))
    process = start_batch(jobs_file, [s.url for s in two_servers], "--max-in-flight", "1")
    wait_for(lambda: sum(r["state"] == batch.DONE for r in all_runs(manifest_of(jobs_file)).values()) >= 2
             and any(r["state"] == batch.RUNNING for r in all_runs(manifest_of(jobs_file)).values()), what="two runs done, one running")
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process, timeout=60)
    assert code == 130 and "run the same command again to resume" in err, out + err
    stopped = all_runs(manifest_of(jobs_file))  # valid JSON: the manifest survived Ctrl-C
    running = {key: run["prompt_id"] for key, run in stopped.items() if run["state"] == batch.RUNNING}
    code, out, err = finish(start_batch(jobs_file, [s.url for s in two_servers], "--max-in-flight", "1"))
    assert code == 0, out + err
    manifest = manifest_of(jobs_file)
    assert_each_run_done_once(jobs_file, manifest, images_per_run=2)
    for key, prompt_id in running.items():  # re-attached by prompt id, not queued again
        assert all_runs(manifest)[key]["prompt_id"] == prompt_id and f"attach  {key[0]} {key[1]}: prompt {prompt_id}" in out
    submitted = set().union(*(history_ids(s) for s in two_servers)) - before
    assert len(submitted) == 8  # one prompt per run, over both invocations


def test_a_run_over_its_time_is_cancelled_and_tried_again_then_fails(two_servers, tmp_path):
    workflow = face_workflow(tmp_path)
    photo(tmp_path / "me.png")
    # A seed no other test runs: a prompt a server has run before comes back from its cache at once.
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "slow", "workflow": workflow.name, "faces": ["me.png"],
                                                      "prompt": "a woman <|image|>", "seeds": [90210]}])
    code, out, err = finish(start_batch(jobs_file, [s.url for s in two_servers], "--job-timeout", "0.05", "--max-attempts", "2"))
    assert code == 1, out + err
    run = all_runs(manifest_of(jobs_file))[("slow", "seed-90210")]
    assert run["state"] == batch.FAILED and run["error"] == "2 attempts failed; the last: no result within --job-timeout 0.05 s"
    assert {error.split(": ", 1)[0] for error in run["errors"]} == {s.url for s in two_servers}  # the retry went to the other server
    wait_for(lambda: all(not runner.ComfyClient(s.url).get_json("/queue")["queue_running"] for s in two_servers), 60,
             "the cancelled runs to stop")


def test_load_every_one_of_hundreds_of_runs_ends_exactly_once(two_servers, tmp_path):
    # ComfyUI serves a prompt it has run before from its cache, so this measures the batch's own path: queueing,
    # /queue and /history, downloads and manifest writes.
    runs = 300
    workflow = tmp_path / "tiny.json"
    workflow.write_text(json.dumps(TINY_WORKFLOW))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"j{i:03d}", "workflow": workflow.name} for i in range(runs)])
    before = [history_ids(s) for s in two_servers]
    code, out, err = finish(start_batch(jobs_file, [s.url for s in two_servers], "--max-in-flight", "4", "--progress-every", "5"),
                            timeout=900)
    assert code == 0, out[-3000:] + err
    manifest = manifest_of(jobs_file)
    assert len(all_runs(manifest)) == runs
    assert_each_run_done_once(jobs_file, manifest, images_per_run=1)
    submitted = [history_ids(s) - b for s, b in zip(two_servers, before)]
    assert sum(map(len, submitted)) == runs and all(submitted)  # one prompt per run, on both servers
    throughput = re.search(r"(\d+) run\(s\) ended in ([\d.]+) s \(([\d.]+) runs/s", out)
    assert throughput and int(throughput.group(1)) == runs
    print(f"\nload test: {throughput.group(0)})")
