"""scripts/facediffuser_batch.py: the jobs file and the manifest (plain tier), and whole batches against two
real ComfyUI servers on loopback ports with the tiny models (ComfyUI tier): runs spread over both servers,
a server killed mid-run, the client stopped and resumed, a bad photo failing alone, and a load test of a few
hundred tiny runs in which every run must end exactly once; with the Identity Score node, scores in the manifest
and best-of-N per job, decided once."""

from __future__ import annotations

import contextlib
import json
import os
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

from dev.devkit import comfy_harness
import comfy_server
import pack_scripts
from facediffuser_client import api_workflow, http_api
from facediffuser_client.executor import ExecutorSettings
from facediffuser_client.jobs import JobsFileError, load_jobs
from facediffuser_client.manifest import DONE, FAILED, PENDING, RUNNING, Manifest, read_manifest
from facediffuser_client.scheduler import Scheduler
from facediffuser_client.servers import ServerExecutor

batch = pack_scripts.load("facediffuser_batch")
SCRIPT = pack_scripts.SCRIPTS_DIR / "facediffuser_batch.py"
EXAMPLE = pack_scripts.SCRIPTS_DIR.parent / "workflows" / "jobs_example.jsonl"


TINY_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tiny"}},
}


def with_identity_score(workflow: dict) -> dict:
    """The workflow with a Face-diffuser Identity Score node scoring what its Save Image saves. The tiny models
    paint no face, so the saved pictures become the reference photo with 30 % of the sampled picture blended in:
    the face is found, and each seed scores differently."""
    def node_of(class_type: str) -> str:
        (node_id,) = [i for i, node in workflow.items() if node["class_type"] == class_type]
        return node_id

    saver, encoder = node_of("SaveImage"), node_of("FaceDiffuserEncodeReferenceFaces")
    references = workflow[encoder]["inputs"]["images"]
    workflow["100"] = {"class_type": "ImageBlend", "inputs": {"image1": references, "image2": workflow[saver]["inputs"]["images"],
                                                              "blend_factor": 0.3, "blend_mode": "normal"}}
    workflow[saver]["inputs"]["images"] = ["100", 0]
    workflow["101"] = {"class_type": "FaceDiffuserIdentityScore", "inputs": {
        "references": references, "images": ["100", 0], "face_analysis": workflow[encoder]["inputs"]["face_analysis"],
        "recognition": "insightface", "keep_best": 0}}
    return workflow


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
    jobs = load_jobs(tmp_path / EXAMPLE.name)
    assert [job.problem for job in jobs] == [None] * len(jobs)
    assert all(job.workflow and job.seeds for job in jobs)


def test_seeds_counts_ids_and_overrides(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    jobs = load_jobs(write_jobs(tmp_path / "jobs.jsonl", [
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
    again = load_jobs(write_jobs(tmp_path / "reordered.jsonl", [plain.spec, counted.spec]))
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
    shipped = api_workflow.load_api_workflow(api_workflow.shipped_workflow(1))
    (tmp_path / "wf.json").write_text(json.dumps(shipped))
    (tmp_path / "no_latent.json").write_text(json.dumps({k: v for k, v in shipped.items() if v["class_type"] != "EmptyLatentImage"}))
    (job,) = load_jobs(write_jobs(tmp_path / "jobs.jsonl", [spec]))
    assert problem in job.problem and job.seeds


def test_a_broken_jobs_file_is_refused_whole(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(JobsFileError, match=r"line 2: not a JSON object"):
        load_jobs(path)
    path.write_text('{"id": "a"}\n# a comment\n\n{"id": "a", "count": 2}\n')
    with pytest.raises(JobsFileError, match=r"lines 1 and 4: both are job 'a'"):
        load_jobs(path)


def test_the_manifest_keeps_every_change_and_failed_runs_come_back_on_request(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "faces": ["a.png"], "seeds": [1, 2]}])
    jobs = load_jobs(jobs_file)
    manifest = Manifest(tmp_path, jobs_file)
    manifest.add_jobs(jobs, retry_failed=False)
    manifest.move("a", "seed-1", FAILED, error="boom", attempts=3)
    manifest.export_json()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert json.loads((tmp_path / "manifest.json").read_text())["jobs"] == read_manifest(tmp_path)["jobs"]
    reread = Manifest(tmp_path, jobs_file)
    reread.add_jobs(jobs, retry_failed=False)
    assert reread.run("a", "seed-1")["state"] == FAILED
    reread.add_jobs(jobs, retry_failed=True)
    assert reread.run("a", "seed-1")["state"] == PENDING and reread.run("a", "seed-1")["attempts"] == 0


def test_best_of_n_without_an_identity_score_node_fails_the_job_with_the_fix(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "scored.json").write_text(json.dumps(with_identity_score(api_workflow.load_api_workflow(api_workflow.shipped_workflow(1)))))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "asks", "faces": ["a.png"], "count": 2, "keep_best": 1},
        {"id": "by-default", "faces": ["a.png"]},
        {"id": "opts-out", "faces": ["a.png"], "keep_best": 0},
        {"id": "scored", "faces": ["a.png"], "workflow": "scored.json", "keep_best": -1},
    ])
    asks, by_default, opts_out, scored = load_jobs(jobs_file, keep_best=2)
    assert asks.problem.startswith('"keep_best": best-of-N ranks the pictures by the workflow\'s FaceDiffuserIdentityScore node, '
                                   "but it has no such node. Add one Face-diffuser Identity Score")
    assert asks.problem.endswith('; or take "keep_best" out of this job')
    assert by_default.problem.startswith('--keep-best (for the jobs without "keep_best"): best-of-N ranks')
    assert by_default.problem.endswith('; or give this job "keep_best": 0')
    assert opts_out.problem is None and opts_out.keep_best == 0
    assert scored.problem == '"keep_best" must be an integer: the pictures to keep across the job\'s seeds (0: no best-of-N)'
    (scored,) = load_jobs(write_jobs(tmp_path / "scored.jsonl", [{"faces": ["a.png"], "workflow": "scored.json"}]), keep_best=2)
    assert scored.problem is None and scored.keep_best == 2 and scored.best_node == "101" and scored.scorers == {"101": "13"}
    # Nothing is queued: the job fails before the batch starts, named with its line and the fix.
    code, out, err = finish(start_batch(write_jobs(tmp_path / "one.jsonl", [asks.spec]), [f"http://127.0.0.1:{comfy_server.free_port()}"]),
                            timeout=60)
    assert code == 1, out + err
    assert 'failed  asks (line 1): "keep_best": best-of-N ranks the pictures' in out and "export the workflow again" in out
    assert re.search(r"^asks +0/2 +2 +0 +\"keep_best\": best-of-N ranks", out, re.M)


def scored_run(batch_index_scores: list[float], key: str) -> dict:
    """A done run as the manifest keeps it, with its pictures' scores (one subject each)."""
    return {"files": [f"outputs/j/{key}/p{i}.png" for i in range(len(batch_index_scores))],
            "scores": [{"batch_index": i, "score": score, "node": "101", "file": f"outputs/j/{key}/p{i}.png",
                        "subjects": [{"subject": 0, "similarity": score}]} for i, score in enumerate(batch_index_scores)]}


def test_best_of_n_ranks_across_seeds_breaks_ties_by_seed_order_and_never_overwrites(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "scored.json").write_text(json.dumps(with_identity_score(api_workflow.load_api_workflow(api_workflow.shipped_workflow(1)))))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "j", "faces": ["a.png"], "workflow": "scored.json", "seeds": [9, 3, 5],
                                                      "keep_best": 3}])
    jobs = load_jobs(jobs_file)
    manifest = Manifest(tmp_path, jobs_file)
    manifest.add_jobs(jobs, retry_failed=False)
    scores = {"seed-9": [0.5, 0.8], "seed-3": [0.8, 0.9], "seed-5": [-1.0, 0.8]}
    for key, run_scores in scores.items():
        manifest.move("j", key, RUNNING)
        manifest.move("j", key, DONE, **scored_run(run_scores, key))
        for index, file in enumerate(manifest.run("j", key)["files"]):
            (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / file).write_bytes(f"{key} picture {index}".encode())
    best = tmp_path / "outputs" / "j" / "best"
    best.mkdir()
    (best / "best01_seed-3_1.png").write_bytes(b"seed-3 picture 1")  # the same picture: a copy from a stopped invocation
    (best / "best02_seed-9_1.png").write_bytes(b"the user's own file")
    said = []
    the_batch = Scheduler(jobs, manifest, tmp_path, say=said.append)
    the_batch.decide_best("j")
    decided = manifest.best("j")
    # 0.9 first; then the three 0.8s in the order the job lists its seeds (9, 3, 5), whatever their numbers
    assert [(k["rank"], k["run"], k["seed"], k["batch_index"], k["score"]) for k in decided["pictures"]] == [
        (1, "seed-3", 3, 1, 0.9), (2, "seed-9", 9, 1, 0.8), (3, "seed-3", 3, 0, 0.8)]
    assert [Path(k["kept_as"]).name for k in decided["pictures"]] == ["best01_seed-3_1.png", "best02_seed-9_1-1.png", "best03_seed-3_0.png"]
    assert (best / "best02_seed-9_1.png").read_bytes() == b"the user's own file"
    for kept in decided["pictures"]:
        assert (tmp_path / kept["kept_as"]).read_bytes() == (tmp_path / kept["file"]).read_bytes()
        picture = manifest.run("j", kept["run"])["scores"][kept["batch_index"]]
        assert picture["kept_as"] == kept["kept_as"]
    assert sum("kept_as" in p for run in scores for p in manifest.run("j", run)["scores"]) == 3
    assert Manifest(tmp_path, jobs_file).best("j") == decided  # saved
    assert said == ["best    j: best01_seed-3_1.png (0.900), best02_seed-9_1-1.png (0.800), best03_seed-3_0.png (0.800)"]
    the_batch.decide_best("j")  # decided once
    assert manifest.best("j") == decided and len(list(best.iterdir())) == 4


def test_which_failures_another_server_may_not_have():
    def entry(event, data):
        return {"status": {"status_str": "error", "messages": [["execution_start", {}], [event, data]]}}

    assert http_api.transient_failure(entry("execution_interrupted", {"node_id": "3"}))
    assert http_api.transient_failure(entry("execution_error", {"exception_type": "torch.OutOfMemoryError"}))
    assert not http_api.transient_failure(entry("execution_error", {"exception_type": "ValueError"}))


def test_without_any_server_the_batch_gives_up_in_time_and_keeps_its_runs(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_WORKFLOW))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "workflow": "tiny.json"}])
    closed = f"http://127.0.0.1:{comfy_server.free_port()}"
    code, out, err = finish(start_batch(jobs_file, [closed], "--give-up-after", "1"), timeout=60)
    assert code == 3 and "no server has answered for 1 s" in err and "Run the same command again to resume" in err
    assert f"server  {closed} stopped answering" in out
    assert all_runs(manifest_of(jobs_file))[("a", "seed-workflow")]["state"] == PENDING


RAY_PROBE = """
import sys
sys.path[:0] = {paths!r}
{before}
import facediffuser_batch
code = facediffuser_batch.main(sys.argv[1:])
print("ray imported" if sys.modules.get("ray") else "ray not imported", code)
"""


def run_probe(tmp_path: Path, *options: str, before: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_WORKFLOW))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "workflow": "tiny.json"}])
    probe = RAY_PROBE.format(paths=[str(pack_scripts.SCRIPTS_DIR)], before=before)
    return subprocess.run([sys.executable, "-c", probe, str(jobs_file), *options], capture_output=True, text=True, timeout=120)


def test_without_ray_the_batch_never_imports_it(tmp_path):
    closed = f"http://127.0.0.1:{comfy_server.free_port()}"
    ran = run_probe(tmp_path, "--server", closed, "--give-up-after", "0")
    assert ran.stdout.splitlines()[-1] == "ray not imported 3", ran.stdout + ran.stderr


def test_ray_asked_for_but_not_installed_is_an_error_with_the_install_command(tmp_path):
    ran = run_probe(tmp_path, "--ray", before='sys.modules["ray"] = None  # as if Ray were not installed')
    assert ran.stdout.splitlines()[-1] == "ray not imported 1", ran.stdout + ran.stderr
    assert "error: --ray needs Ray on this machine and on every node of the cluster: pip install ray==2.60.0" in ran.stderr


def test_ray_and_server_options_do_not_mix(capsys):
    with pytest.raises(SystemExit):
        batch.parse_args(["jobs.jsonl", "--ray", "--server", "http://127.0.0.1:8188"])
    assert "give either --server" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        batch.parse_args(["jobs.jsonl", "--ray-workers", "2"])
    assert "go with --ray" in capsys.readouterr().err


# --- the scheduler's rules, against scripted servers ---------------------------------------------------------


class ScriptedServer:
    """A ComfyUI client whose server queues what it is given and runs it only when the test says so; it can stop
    answering, or miss the next /history requests alone (a server busy past the client's timeout)."""

    def __init__(self, url: str):
        self.server, self.running, self.pending, self.history = url, [], [], {}
        self.down, self.history_misses, self.submitted, self.cancelled = False, 0, [], []

    def get_json(self, path: str):
        if self.down:
            raise http_api.ServerUnreachable(self.server, "connection refused")
        if path == "/queue":
            return {"queue_running": [[0, p] for p in self.running], "queue_pending": [[n + 1, p] for n, p in enumerate(self.pending)]}
        if path.startswith("/history/"):
            if self.history_misses:
                self.history_misses -= 1
                raise http_api.ServerUnreachable(self.server, "timed out")
            prompt_id = path.rsplit("/", 1)[1]
            return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
        return {}

    def submit(self, workflow: dict, client_id: str) -> str:
        if self.down:
            raise http_api.ServerUnreachable(self.server, "connection refused")
        prompt_id = f"{self.server.rsplit(':', 1)[1]}-{len(self.submitted)}"
        self.submitted.append(prompt_id)
        self.pending.append(prompt_id)
        return prompt_id

    def start(self, prompt_id: str) -> None:
        self.pending.remove(prompt_id)
        self.running.append(prompt_id)

    def cancel(self, prompt_id: str) -> None:
        self.cancelled.append(prompt_id)
        for queue in (self.running, self.pending):
            if prompt_id in queue:
                queue.remove(prompt_id)


def scripted_batch(tmp_path: Path, job_ids: list[str], ports: list[int], *options: str):
    """A batch of one-run jobs whose servers are ScriptedServers (returned in the order of `ports`)."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_WORKFLOW))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": job, "workflow": "tiny.json"} for job in job_ids])
    jobs = load_jobs(jobs_file)
    manifest = Manifest(tmp_path, jobs_file)
    manifest.add_jobs(jobs, retry_failed=False)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    args = batch.parse_args([str(jobs_file), *(a for url in urls for a in ("--server", url)), *options])
    the_batch = Scheduler(jobs, manifest, tmp_path, max_attempts=args.max_attempts, say=lambda text: None, clock=ManualClock())
    executor = ServerExecutor(the_batch, ExecutorSettings(args.max_in_flight, args.job_timeout, args.poll), urls)
    scripted = [ScriptedServer(url) for url in urls]
    for server in scripted:
        executor.servers[server.server].client = server
    the_batch.start(executor)
    return the_batch, scripted


class ManualClock:
    """The scheduler's clock in the scripted tests: back-offs end when the test says so."""

    def __init__(self):
        self.time = 0.0

    def now(self) -> float:
        return self.time


def back_offs_over(the_batch) -> None:
    the_batch.clock.time += 3600


def run_of(the_batch, job_id: str) -> dict:
    return the_batch.manifest.run(job_id, "seed-workflow")


def test_a_server_that_misses_one_poll_costs_each_of_its_runs_one_attempt(tmp_path):
    the_batch, (server,) = scripted_batch(tmp_path, ["j1", "j2", "j3"], [1], "--max-in-flight", "3")
    the_batch.dispatch()
    assert len(server.submitted) == 3
    server.history_misses = 1  # the first run's /history times out; the server answers again right after
    the_batch.executor.poll()
    assert [run_of(the_batch, job)["attempts"] for job in ("j1", "j2", "j3")] == [1, 1, 1]


def test_runs_requeued_from_a_server_that_comes_back_are_cancelled_there_or_reattached(tmp_path):
    the_batch, (slow, spare) = scripted_batch(tmp_path, ["j1", "j2"], [1, 2], "--max-in-flight", "2")
    spare.down = True
    the_batch.dispatch()
    first, second = slow.submitted
    slow.history_misses = 1  # busy past the client's timeout: both runs go back to pending, yet keep running there
    the_batch.executor.poll()
    assert {run_of(the_batch, job)["state"] for job in ("j1", "j2")} == {PENDING}
    spare.down = False
    the_batch.executor.servers[spare.server].retry_at = 0
    the_batch.executor.submit(the_batch.order("j1", "seed-workflow"))  # j1 goes elsewhere (the slow one is down), j2 still waits
    the_batch.executor.read_queue(the_batch.executor.servers[slow.server])  # the slow server answers again
    assert slow.cancelled == [first]  # j1's copy there would be duplicate work
    assert run_of(the_batch, "j2")["state"] == RUNNING and run_of(the_batch, "j2")["prompt_id"] == second  # j2 picked up again
    the_batch.dispatch()
    assert slow.submitted == [first, second] and spare.submitted == ["2-0"]  # nothing submitted twice


def test_a_server_answering_again_during_dispatch_takes_its_runs_back_without_a_second_submission(tmp_path):
    the_batch, (slow,) = scripted_batch(tmp_path, ["j1", "j2"], [1], "--max-in-flight", "3", "--poll", "0")
    the_batch.dispatch()
    slow.history_misses = 1
    the_batch.executor.poll()
    back_offs_over(the_batch)
    the_batch.executor.servers[slow.server].retry_at = 0
    the_batch.dispatch()
    assert slow.submitted == ["1-0", "1-1"] and slow.cancelled == []
    assert [run_of(the_batch, job)["prompt_id"] for job in ("j1", "j2")] == ["1-0", "1-1"]


def test_the_job_timeout_counts_from_the_start_of_the_run_not_its_time_in_the_queue(tmp_path):
    the_batch, (server,) = scripted_batch(tmp_path, ["j1"], [1], "--job-timeout", "0.05")
    the_batch.dispatch()
    run_of(the_batch, "j1")["submitted"] = time.time() - 3600  # queued behind other users, or before a resume
    the_batch.executor.poll()
    time.sleep(0.1)
    the_batch.executor.poll()
    assert server.cancelled == [] and run_of(the_batch, "j1")["state"] == RUNNING
    server.start(server.submitted[0])
    the_batch.executor.poll()
    time.sleep(0.1)  # past --job-timeout since it started
    the_batch.executor.poll()
    assert server.cancelled == server.submitted and run_of(the_batch, "j1")["state"] == PENDING
    assert run_of(the_batch, "j1")["errors"] == [f"{server.server}: no result within --job-timeout 0.05 s"]


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
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # a failed test leaves no batch running
        process.communicate()
        raise
    return process.returncode, out, err


def manifest_of(jobs_file: Path) -> dict:
    """The live manifest of the batch of `jobs_file` (also while it runs)."""
    return read_manifest(jobs_file.with_name(f"{jobs_file.stem}_run"))


def rewrite_manifest(run_dir: Path, data: dict) -> None:
    """The run directory as if an earlier invocation had left `data` as its manifest (imported at the next start)."""
    for name in ("manifest.sqlite", "manifest.sqlite-wal", "manifest.sqlite-shm"):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps(data))


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
    return set(http_api.ComfyClient(server.url).get_json("/history"))


def assert_each_run_done_once(jobs_file: Path, manifest: dict, images_per_run: int) -> None:
    """Every run done, with its own folder holding exactly its pictures, and nothing else in the outputs."""
    run_dir = jobs_file.with_name(f"{jobs_file.stem}_run")
    runs = all_runs(manifest)
    assert {run["state"] for run in runs.values()} == {DONE}, {k: r["state"] for k, r in runs.items() if r["state"] != DONE}
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
    assert {k: r["state"] for k, r in runs.items()} == {**{(f"me-{i}", f"seed-{10 * i + s}"): DONE for i in range(3) for s in (0, 1)},
                                                      ("blank", "seed-workflow"): FAILED, ("zero-steps", "seed-workflow"): FAILED}
    assert {run["done_on"] for run in runs.values() if run["state"] == DONE} == {s.url for s in two_servers}
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
        on_doomed = lambda: any(r["state"] == RUNNING and r["server"] == doomed.url for r in all_runs(manifest_of(jobs_file)).values())
        wait_for(lambda: on_doomed() and sum(r["state"] == DONE for r in all_runs(manifest_of(jobs_file)).values()) >= 1,
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
    wait_for(lambda: sum(r["state"] == DONE for r in all_runs(manifest_of(jobs_file)).values()) >= 2
             and any(r["state"] == RUNNING for r in all_runs(manifest_of(jobs_file)).values()), what="two runs done, one running")
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process, timeout=60)
    assert code == 130 and "run the same command again to resume" in err, out + err
    stopped = all_runs(manifest_of(jobs_file))  # valid JSON: the manifest survived Ctrl-C
    running = {key: run["prompt_id"] for key, run in stopped.items() if run["state"] == RUNNING}
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
    # A seed no other test runs (a prompt a server has run before comes back from its cache at once) and 300 steps
    # (seconds even where the tiny models run a hundred steps a second), far beyond the 0.05 s allowed.
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "slow", "workflow": workflow.name, "faces": ["me.png"],
                                                      "prompt": "a woman <|image|>", "seeds": [90210], "steps": 300}])
    code, out, err = finish(start_batch(jobs_file, [s.url for s in two_servers], "--job-timeout", "0.05", "--max-attempts", "2"))
    assert code == 1, out + err
    run = all_runs(manifest_of(jobs_file))[("slow", "seed-90210")]
    assert run["state"] == FAILED and run["error"] == "2 attempts failed; the last: no result within --job-timeout 0.05 s"
    assert {error.split(": ", 1)[0] for error in run["errors"]} == {s.url for s in two_servers}  # the retry went to the other server
    wait_for(lambda: all(not http_api.ComfyClient(s.url).get_json("/queue")["queue_running"] for s in two_servers), 60,
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


def test_scores_go_into_the_manifest_and_best_of_n_keeps_each_jobs_best_once(two_servers, tmp_path):
    import tiny_install

    workflow = tmp_path / "scored.json"
    workflow.write_text(json.dumps(with_identity_score(tiny_install.small_api_workflow("facediffuser_single_subject"))))
    photo(tmp_path / "me.png")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "two-best", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|> in a cafe", "count": 3, "seed": 1,
         "batch_size": 2, "keep_best": 2},
        {"id": "one-best", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|> on a beach", "seeds": [8, 4]},
    ])
    urls = [s.url for s in two_servers]
    code, out, err = finish(start_batch(jobs_file, urls, "--keep-best", "1"))
    assert code == 0, out + err
    run_dir = jobs_file.with_name("jobs_run")
    manifest = manifest_of(jobs_file)
    for job_id, keep_best, keys in (("two-best", 2, ["seed-1", "seed-2", "seed-3"]), ("one-best", 1, ["seed-8", "seed-4"])):
        runs = manifest["jobs"][job_id]["runs"]
        pictures = []  # (score, seed order, batch index, picture)
        for order, key in enumerate(keys):
            scores = runs[key]["scores"]
            assert [p["batch_index"] for p in scores] == list(range(2 if job_id == "two-best" else 1))
            for picture in scores:  # the node's own record, and the saved picture it scored
                assert picture["node"] == "101" and picture["model"] == "arcface_stand_in" and picture["faces"] == 1
                (subject,) = picture["subjects"]
                assert subject["subject"] == 0 and not subject["missing"] and subject["similarity"] == picture["score"] > 0.5
                assert picture["file"] in runs[key]["files"] and Path(picture["file"]).name.startswith("facediffuser")
                pictures.append((picture["score"], order, picture["batch_index"], picture))
        assert len({score for score, *_ in pictures}) == len(pictures)  # every picture scores differently
        best = manifest["jobs"][job_id]["best"]
        assert best["keep_best"] == keep_best and best["node"] == "101"
        expected = sorted(pictures, key=lambda p: (-p[0], p[1], p[2]))[:keep_best]
        assert [(k["run"], k["batch_index"], k["score"]) for k in best["pictures"]] == [(keys[o], b, s) for s, o, b, _ in expected]
        for rank, kept in enumerate(best["pictures"], start=1):
            assert kept["kept_as"] == f"outputs/{job_id}/best/best{rank:02d}_{kept['run']}_{kept['batch_index']}.png"
            assert (run_dir / kept["kept_as"]).read_bytes() == (run_dir / kept["file"]).read_bytes()
        assert sorted(p["kept_as"] for _, _, _, p in pictures if "kept_as" in p) == sorted(k["kept_as"] for k in best["pictures"])
        assert sorted(p.name for p in (run_dir / "outputs" / job_id / "best").iterdir()) == sorted(
            Path(k["kept_as"]).name for k in best["pictures"])
        top = max(s for s, *_ in pictures)
        assert re.search(rf"^{job_id} +{len(keys)}/{len(keys)} +0 +\d+ +{top:.3f} \({keep_best} kept\)", out, re.M), out
        assert f"best    {job_id}: best01_" in out

    # Again, even with another --keep-best and no server: nothing is queued or recomputed, the decisions stay.
    listing = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if not p.name.startswith("manifest."))
    closed = f"http://127.0.0.1:{comfy_server.free_port()}"
    code, out, err = finish(start_batch(jobs_file, [closed], "--keep-best", "3"), timeout=60)
    assert code == 0, out + err
    again = manifest_of(jobs_file)
    assert again["jobs"] == manifest["jobs"]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if not p.name.startswith("manifest.")) == listing
    assert "note    job one-best: its best 1 picture(s) were chosen by an earlier invocation and are kept" in out
    assert "\n0 run(s) ended in" in out and "best    " not in out

    # Stopped after copying the best pictures but before writing the manifest: decided again, the same way,
    # from the manifest alone, onto the copies already there.
    for job in again["jobs"].values():
        del job["best"]
        for run in job["runs"].values():
            for picture in run["scores"]:
                picture.pop("kept_as", None)
    rewrite_manifest(run_dir, again)
    code, out, err = finish(start_batch(jobs_file, [closed], "--keep-best", "1"), timeout=60)
    assert code == 0, out + err
    redecided = manifest_of(jobs_file)
    for job_id in ("two-best", "one-best"):
        assert redecided["jobs"][job_id]["best"]["pictures"] == manifest["jobs"][job_id]["best"]["pictures"]
        assert redecided["jobs"][job_id]["runs"] == manifest["jobs"][job_id]["runs"]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if not p.name.startswith("manifest.")) == listing

    # Stopped after saving a run's pictures but before writing the manifest (so before the job's decision):
    # re-attached by prompt id, its folder saved again whole, its scores naming the same files, the same best.
    stopped = manifest_of(jobs_file)
    job = stopped["jobs"]["one-best"]
    del job["best"]
    run = job["runs"]["seed-8"]
    run.update(state=RUNNING, server=run.pop("done_on"), submitted=time.time())
    for name in ("files", "scores", "finished"):
        del run[name]
    for picture in job["runs"]["seed-4"]["scores"]:
        picture.pop("kept_as", None)
    rewrite_manifest(run_dir, stopped)
    code, out, err = finish(start_batch(jobs_file, urls, "--keep-best", "1"))
    assert code == 0, out + err
    assert f"attach  one-best seed-8: prompt {run['prompt_id']}" in out and "done    one-best seed-8" in out
    resaved = manifest_of(jobs_file)["jobs"]["one-best"]
    for key in ("seed-8", "seed-4"):
        for name in ("state", "files", "scores", "prompt_id"):
            assert resaved["runs"][key][name] == manifest["jobs"]["one-best"]["runs"][key][name]
    assert resaved["best"]["pictures"] == manifest["jobs"]["one-best"]["best"]["pictures"]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if not p.name.startswith("manifest.")) == listing


def test_the_readmes_server_batch_commands_run_as_printed(two_servers, tmp_path):
    """Each `--server` command of README.md typed as printed, in a folder that holds the pack's scripts as the pack's
    folder does, with two substitutions: its server addresses become the two test servers' (in order), and its jobs
    file holds two one-run jobs of a tiny workflow."""
    from test_readme_commands import batch_server_commands, run_typed

    commands = batch_server_commands()
    assert len(commands) == 2
    for number, command in enumerate(commands):
        folder = tmp_path / f"command{number}"
        folder.mkdir()
        (folder / "scripts").symlink_to(pack_scripts.SCRIPTS_DIR)
        (folder / "tiny.json").write_text(json.dumps(TINY_WORKFLOW))
        jobs_file = write_jobs(folder / command.split()[2], [{"id": f"job{i}", "workflow": "tiny.json"} for i in range(2)])
        urls = iter(server.url for server in two_servers)
        typed = re.sub(r"--server \S+", lambda _: f"--server {next(urls)}", command)
        done = run_typed(typed, folder, {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
        assert done.returncode == 0, done.stdout + done.stderr
        runs = all_runs(manifest_of(jobs_file))
        assert len(runs) == 2 and {run["state"] for run in runs.values()} == {DONE}


def test_a_ray_head_that_does_not_answer_is_an_error_at_once(tmp_path):
    """Ray itself retries a wrong head address for minutes; the batch says at once that nothing answers there."""
    pytest.importorskip("ray", reason="--ray needs Ray (requirements-test.txt)")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_WORKFLOW))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "workflow": "tiny.json"}])
    port = comfy_server.free_port()
    command = [sys.executable, str(SCRIPT), str(jobs_file), "--ray", f"127.0.0.1:{port}"]
    code, out, err = finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), timeout=90)
    assert code == 1, out + err
    assert f"error: --ray 127.0.0.1:{port}: no Ray head answers there (Connection refused): start one with `ray start --head --port={port}`" in err
    assert "Traceback" not in err
