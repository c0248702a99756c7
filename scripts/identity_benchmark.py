#!/usr/bin/env python3
"""Does giving each person a region reduce identity mixing? Two-person pictures with and without regions.

    python scripts/identity_benchmark.py --face man.png --face woman.png --seeds 8
    python scripts/identity_benchmark.py --face a.png --face b.png --prompts prompts.txt --seeds 4 --server http://127.0.0.1:8188

Runs the shipped `facediffuser_two_subjects_regions` workflow (API format) on a ComfyUI server, once without its
regions, once as it is (each person in their half) and once with auto regions instead (its Region Layout replaced by
the Face-diffuser Auto Regions node of the shipped `facediffuser_two_subjects_auto_regions` workflow: the regions
found around the faces of the scene's predicted picture), for every prompt and seed, with a Face-diffuser Identity
Score node scoring each picture against the reference photos (insightface), and prints a Markdown table with a row
per setting:

- weakest subject (Hungarian): the mean of the pack's picture score, the weakest subject's cosine similarity
  after the one-to-one assignment with the largest total similarity; -1 for a missing subject;
- weakest subject (FastComposer): the mean of FastComposer's multi-subject score, greedy matching (most
  similar pair first), the lowest matched similarity, 0 for a subject without a face;
- mixed: the share of pictures in which some subject's face is closer to another subject's reference;
- missing: the share of pictures in which some subject got no face;
- CLIP score: with --clip (a local folder holding a transformers CLIP model and its processor, e.g. a
  downloaded openai/clip-vit-large-patch14), the mean of 100 * max(cos(image, text), 0) between each picture
  and its prompt without the markers; "n/a" without one (nothing is downloaded);
- time: the mean seconds per picture as the server reports them (after one warm-up picture that loads the
  models), and the ratio to the run without regions (the cost of the masked attention);
- auto regions fell back: with auto regions, the share of pictures in which too few faces were found to give every
  subject a region, so that the picture was made without regions (what the sampler logs, read from the server's
  log stream as the runner shows it); "n/a" for the other settings, or where the server streams no log.

With the official weights it answers "did regions reduce mixing"; with tiny random models (the test suite)
it proves the mechanics only, as such models paint no faces. The prompts come from --prompts (one per
line, each with two <|image|> markers) or the default set below. The server is found or started as by
scripts/facediffuser_run.py (same --server, --comfyui and --comfyui-args); the table goes to stdout and,
with --output, every picture's scores to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from facediffuser_client.api_workflow import (PACK_ROOT, REFERENCE_ENCODER, load_api_workflow, reference_image_loaders,
                                              set_override, use_installed_checkpoints)
from facediffuser_client.server_log import JobLog
from facediffuser_client.best_of_n import IDENTITY_NODE as IDENTITY_SCORE, IDENTITY_RESULT
from facediffuser_client.http_api import ComfyClient, RunError, describe_failure
from facediffuser_client.own_comfyui import attach_command_line_values, server_for

from facediffuser_client.pack import core

# The scoring protocols and the marker rules are facediffuser_core's, as the nodes use them.
greedy_min_similarity = core("identity").greedy_min_similarity
parse_subject_markers = core("markers").parse_subject_markers

WORKFLOW = PACK_ROOT / "workflows" / "api" / "facediffuser_two_subjects_regions.json"
AUTO_WORKFLOW = PACK_ROOT / "workflows" / "api" / "facediffuser_two_subjects_auto_regions.json"
DEFAULT_PROMPTS = (
    "a photo of a man <|image|> and a woman <|image|> walking on a beach at sunset",
    "a photo of a man <|image|> and a woman <|image|> sitting at a table in a cafe",
    "a photo of a man <|image|> and a woman <|image|> standing in front of a mountain lake",
)
NO_REGIONS, REGIONS, AUTO = SETTINGS = ("no regions", "regions", "auto regions")
SAMPLER = "FaceDiffuserSNFSampler"
IDENTITY_NODE = "benchmark_identity"
AUTO_REGIONS = "FaceDiffuserAutoRegions"
AUTO_NODE = "benchmark_auto_regions"
FELL_BACK = "sampling goes on without regions"  # in what a sampler logs when auto regions found too few faces


@dataclass
class Picture:
    setting: str
    prompt: str
    seed: int
    seconds: float
    hungarian: float
    greedy: float
    mixed: bool
    missing: bool
    entry: dict = field(repr=False)
    clip: float | None = None
    fell_back: bool | None = None  # auto regions only, where the server's log was read


def node_of(workflow: dict, class_type: str) -> str:
    found = [node_id for node_id, node in workflow.items() if node["class_type"] == class_type]
    if len(found) != 1:
        raise RunError(f"the benchmark workflow needs exactly one {class_type} node, it has {len(found)}")
    return found[0]


def job(base: dict, setting: str, prompt: str, seed: int, steps: int | None, size: int | None) -> dict:
    """The workflow of one picture: the prompt and seed set, regions kept or dropped, an Identity Score added."""
    workflow = copy.deepcopy(base)
    set_override(workflow, "prompt", prompt)
    set_override(workflow, "seed", seed)
    if steps is not None:
        set_override(workflow, "steps", steps)
    if size is not None:
        for node in workflow.values():
            if node["class_type"] in ("EmptyLatentImage", "FaceDiffuserRegionLayout"):
                node["inputs"].update(width=size, height=size)
    sampler = workflow[node_of(workflow, SAMPLER)]
    if setting != REGIONS:
        sampler["inputs"].pop("regions")
    encoder = workflow[node_of(workflow, REFERENCE_ENCODER)]
    decode = workflow[node_of(workflow, "SaveImage")]["inputs"]["images"]
    if setting == AUTO:
        shipped = load_api_workflow(AUTO_WORKFLOW)
        workflow[AUTO_NODE] = {"class_type": AUTO_REGIONS, "inputs": {
            "vae": workflow[decode[0]]["inputs"]["vae"], "face_analysis": encoder["inputs"]["face_analysis"],
            "expansion": shipped[node_of(shipped, AUTO_REGIONS)]["inputs"]["expansion"]}}
        sampler["inputs"]["auto_regions"] = [AUTO_NODE, 0]
    workflow[IDENTITY_NODE] = {"class_type": IDENTITY_SCORE, "inputs": {
        "references": encoder["inputs"]["images"], "images": decode, "face_analysis": encoder["inputs"]["face_analysis"],
        "recognition": "insightface", "keep_best": 0}}
    return workflow


def execution_seconds(entry: dict) -> float:
    """From the server's own status messages: execution start to success, in seconds."""
    stamps = {event: data.get("timestamp") for event, data in entry.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        return float("nan")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def pictures_of(setting: str, prompt: str, seed: int, entry: dict, clip_scores: list[float | None],
                fell_back: bool | None = None) -> list[Picture]:
    results = entry["outputs"][IDENTITY_NODE][IDENTITY_RESULT]
    seconds = execution_seconds(entry) / max(len(results), 1)
    return [Picture(setting, prompt, seed, seconds, result["score"], greedy_min_similarity(result["similarity"]),
                    any(s["mixed"] for s in result["subjects"]), any(s["missing"] for s in result["subjects"]), result, clip,
                    fell_back)
            for result, clip in zip(results, clip_scores)]


class ClipScorer:
    """CLIP text-image score, 100 * max(cosine, 0), with a transformers CLIP model from a local folder."""

    def __init__(self, folder: Path):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except OSError as error:
            raise RunError(f"--clip: {folder} holds no CLIP model and processor ({error})") from None

    def __call__(self, picture: bytes, prompt: str) -> float:
        import torch
        from PIL import Image

        inputs = self.processor(text=[parse_subject_markers(prompt).text], images=Image.open(io.BytesIO(picture)).convert("RGB"),
                                return_tensors="pt", padding=True)
        with torch.no_grad():
            outputs = self.model(**inputs)
        return 100.0 * max(float(torch.nn.functional.cosine_similarity(outputs.image_embeds, outputs.text_embeds).item()), 0.0)


def table(pictures: list[Picture]) -> str:
    """The Markdown table, one row per setting, times as ratios to the first setting's."""
    rows = ["| setting | pictures | weakest subject (Hungarian) | weakest subject (FastComposer greedy) | mixed | missing | "
            "CLIP score | seconds per picture | time ratio | auto regions fell back |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    baseline = None
    for setting in SETTINGS:
        chosen = [p for p in pictures if p.setting == setting]
        if not chosen:
            continue
        seconds = statistics.mean(p.seconds for p in chosen)
        baseline = seconds if baseline is None else baseline
        clip = [p.clip for p in chosen if p.clip is not None]
        fell_back = [p.fell_back for p in chosen if p.fell_back is not None]
        rows.append(f"| {setting} | {len(chosen)} | {statistics.mean(p.hungarian for p in chosen):.3f} | "
                    f"{statistics.mean(p.greedy for p in chosen):.3f} | {sum(p.mixed for p in chosen) / len(chosen):.0%} | "
                    f"{sum(p.missing for p in chosen) / len(chosen):.0%} | {f'{statistics.mean(clip):.2f}' if clip else 'n/a'} | "
                    f"{seconds:.2f} | {seconds / baseline:.3f} | {f'{sum(fell_back) / len(fell_back):.0%}' if fell_back else 'n/a'} |")
    return "\n".join(rows)


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    wrong = [prompt for prompt in prompts if prompt.count("<|image|>") != 2]
    if not prompts or wrong:
        raise RunError("--prompts: every line needs two <|image|> markers, one per --face"
                              + (f"; this one has {wrong[0].count('<|image|>')}: '{wrong[0]}'" if wrong else f"; {path} has no prompt"))
    return prompts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two-person pictures without regions, with them and with auto regions, "
                                                 "scored for identity mixing.")
    parser.add_argument("--face", action="append", type=Path, default=[], metavar="PHOTO",
                        help="a reference photo; exactly two, in the order of the prompts' markers")
    parser.add_argument("--prompts", type=Path, help="a text file, one prompt per line (default: three built-in prompts)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt and setting, from --seed on (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the workflow's 50)")
    parser.add_argument("--size", type=int, help="picture width and height in pixels (default: the workflow's 512)")
    parser.add_argument("--workflow", type=Path, default=WORKFLOW, help="an API workflow built like the default one")
    parser.add_argument("--output", type=Path, help="write every picture's scores to this JSON file")
    parser.add_argument("--clip", type=Path, metavar="FOLDER",
                        help="a local transformers CLIP model folder (model and processor) for the CLIP text-image score")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for each picture (default 3600)")
    parser.add_argument("--server", help="ComfyUI's address (default: as scripts/facediffuser_run.py finds or starts one)")
    parser.add_argument("--comfyui", type=Path, help="the ComfyUI folder to start when no server answers")
    parser.add_argument("--comfyui-args", metavar="ARGS", help="more arguments for that ComfyUI's main.py")
    args = parser.parse_args(attach_command_line_values(sys.argv[1:] if argv is None else argv))
    args.keep_server = False
    if len(args.face) != 2:
        parser.error(f"--face is given {len(args.face)} time(s); the benchmark compares two people: give two photos")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def run(args: argparse.Namespace, client: ComfyClient) -> list[Picture]:
    base = load_api_workflow(args.workflow)
    loaders = reference_image_loaders(base)
    if len(loaders) != 2:
        raise RunError(f"--workflow loads {len(loaders)} reference photo(s); the benchmark needs a two-person workflow")
    for node_id, photo in zip(loaders, args.face):
        base[node_id]["inputs"]["image"] = client.upload_image(photo)
    use_installed_checkpoints(base, client)
    prompts = read_prompts(args.prompts)
    clip_scorer = ClipScorer(args.clip) if args.clip else None
    saver = node_of(base, "SaveImage")
    client_id = uuid.uuid4().hex
    with contextlib.closing(JobLog(client.server, client_id)) as log:

        def picture_job(setting: str, prompt: str, seed: int) -> tuple[dict, bool | None]:
            """The job's history entry, and for auto regions whether they fell back (None where the log is not read)."""
            prompt_id = client.submit(job(base, setting, prompt, seed, args.steps, args.size), client_id=client_id)
            entry = client.wait(prompt_id, args.timeout, report=lambda state: None)
            log.wait_for_end(prompt_id)
            records = log.take(prompt_id)
            if entry.get("status", {}).get("status_str") != "success":
                raise RunError(describe_failure(entry))
            return entry, (None if setting != AUTO or log.unavailable else any(FELL_BACK in record for record in records))

        # A warm-up picture, not counted: the first job loads the models, which would weigh on one setting's time.
        # Its seed is none of the measured ones, whose pictures ComfyUI's cache would otherwise hand back unsampled.
        picture_job(SETTINGS[0], prompts[0], args.seed + args.seeds)
        pictures = []
        for prompt in prompts:
            for seed in range(args.seed, args.seed + args.seeds):
                for setting in SETTINGS:
                    entry, fell_back = picture_job(setting, prompt, seed)
                    saved = entry["outputs"][saver]["images"]
                    clip_scores = [clip_scorer(client.download(image), prompt) for image in saved] if clip_scorer else [None] * len(saved)
                    pictures += pictures_of(setting, prompt, seed, entry, clip_scores, fell_back)
                    print(f"{setting}, seed {seed}: score {pictures[-1].hungarian:.3f} ({prompt})", file=sys.stderr)
    return pictures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with server_for(args) as server:
            pictures = run(args, ComfyClient(server))
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table(pictures))
    if args.output:
        args.output.write_text(json.dumps([{"setting": p.setting, "prompt": p.prompt, "seed": p.seed, "seconds": p.seconds,
                                            "greedy": p.greedy, "clip": p.clip, "auto_regions_fell_back": p.fell_back, **p.entry}
                                           for p in pictures], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
