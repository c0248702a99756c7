"""scripts/identity_benchmark.py: the scoring protocols and the table (plain tier), and a whole run on tiny
models against a ComfyUI server started on 127.0.0.1 (needs COMFYUI_PATH)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pack_scripts
from facediffuser_core.identity import assign_subjects, greedy_min_similarity
from test_headless_runner import server  # noqa: F401  (the module's ComfyUI server on 127.0.0.1)

benchmark = pack_scripts.load("identity_benchmark")


def test_fastcomposer_greedy_score_differs_from_the_hungarian_weakest_subject():
    # Greedy takes the 0.9 pair first and leaves subject 2 with 0.1; the best total assignment gives 0.8 and 0.7.
    similarity = np.array([[0.9, 0.8], [0.7, 0.1]])
    assert greedy_min_similarity(similarity) == pytest.approx(0.1)
    assert min(s.similarity for s in assign_subjects(similarity, 0.3)) == pytest.approx(0.7)
    assert greedy_min_similarity(np.array([[0.6], [0.2]])) == 0.0  # a subject without a face scores 0
    assert greedy_min_similarity(np.zeros((2, 0))) == 0.0


def picture(setting, hungarian, greedy, mixed=False, missing=False, seconds=1.0, clip=None, fell_back=None):
    return benchmark.Picture(setting, "p", 0, seconds, hungarian, greedy, mixed, missing, {}, clip, fell_back)


def test_table_reports_means_shares_and_the_time_ratio():
    pictures = [picture("no regions", 0.2, 0.1, mixed=True), picture("no regions", 0.4, 0.3, missing=True),
                picture("regions", 0.5, 0.5, seconds=1.02, clip=20.0), picture("regions", 0.7, 0.6, mixed=True, seconds=1.02, clip=25.0),
                picture("auto regions", 0.4, 0.3, seconds=1.1, fell_back=True), picture("auto regions", 0.6, 0.5, seconds=1.1, fell_back=False),
                picture("auto regions", 0.5, 0.4, seconds=1.1, fell_back=False), picture("auto regions", 0.5, 0.4, seconds=1.1, fell_back=False)]
    lines = benchmark.table(pictures).splitlines()
    assert lines[0].startswith("| setting | pictures | weakest subject (Hungarian) | weakest subject (FastComposer greedy) | mixed")
    assert lines[0].endswith("| time ratio | auto regions fell back |")
    assert lines[2] == "| no regions | 2 | 0.300 | 0.200 | 50% | 50% | n/a | 1.00 | 1.000 | n/a |"
    assert lines[3] == "| regions | 2 | 0.600 | 0.550 | 50% | 0% | 22.50 | 1.02 | 1.020 | n/a |"
    assert lines[4] == "| auto regions | 4 | 0.500 | 0.400 | 0% | 0% | n/a | 1.10 | 1.100 | 25% |"


def test_the_job_keeps_drops_or_finds_the_regions_and_scores_the_saved_picture():
    base = json.loads(benchmark.WORKFLOW.read_text())
    with_regions = benchmark.job(base, "regions", "a man <|image|> and a woman <|image|>", 3, steps=4, size=64)
    without = benchmark.job(base, "no regions", "a man <|image|> and a woman <|image|>", 3, steps=4, size=64)
    auto = benchmark.job(base, "auto regions", "a man <|image|> and a woman <|image|>", 3, steps=4, size=64)
    sampler = benchmark.node_of(with_regions, "FaceDiffuserSNFSampler")
    assert "regions" in with_regions[sampler]["inputs"] and "regions" not in without[sampler]["inputs"]
    assert "auto_regions" not in with_regions[sampler]["inputs"] and "auto_regions" not in without[sampler]["inputs"]
    # auto regions as the shipped auto-regions workflow wires them: the decoding VAE, the reference faces' analysis
    assert "regions" not in auto[sampler]["inputs"] and auto[sampler]["inputs"]["auto_regions"] == [benchmark.AUTO_NODE, 0]
    decode = auto[auto[benchmark.node_of(auto, "SaveImage")]["inputs"]["images"][0]]
    assert auto[benchmark.AUTO_NODE]["inputs"] == {"vae": decode["inputs"]["vae"], "expansion": 1.0,
                                                    "face_analysis": auto[benchmark.node_of(auto, "FaceDiffuserEncodeReferenceFaces")]["inputs"]["face_analysis"]}
    assert with_regions[sampler]["inputs"]["seed"] == 3 and with_regions[sampler]["inputs"]["steps"] == 4
    layout = benchmark.node_of(with_regions, "FaceDiffuserRegionLayout")
    assert with_regions[layout]["inputs"]["width"] == 64
    identity = with_regions[benchmark.IDENTITY_NODE]["inputs"]
    assert identity["images"] == with_regions[benchmark.node_of(with_regions, "SaveImage")]["inputs"]["images"]


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--face", "a.png"])
    assert "give two photos" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man <|image|> alone\n")
    with pytest.raises(benchmark.RunError, match="every line needs two <|image|> markers.*has 1"):
        benchmark.read_prompts(prompts)


def tiny_clip(folder):
    """A tiny random CLIP with ComfyUI's bundled SD1 tokenizer files, saved as transformers saves one."""
    from dev.devkit import comfy_harness
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
    CLIPModel(CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 16},
                         projection_dim=16)).save_pretrained(folder)
    vocabulary = comfy_harness.comfyui_path() / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer(str(vocabulary / "vocab.json"), str(vocabulary / "merges.txt"))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_a_run_on_tiny_models_prints_the_table(server, tmp_path, capsys):
    import tiny_install

    tiny_install.install_models(server.models_dir)
    photos = tiny_install.write_face_photos(tmp_path / "photos", names=("bench_1.png", "bench_2.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a man <|image|> and a woman <|image|> on a beach\n")
    output = tmp_path / "scores.json"
    code = benchmark.main(["--server", server.url, "--face", str(photos[0]), "--face", str(photos[1]), "--prompts", str(prompts),
                           "--seeds", "2", "--steps", "3", "--size", "64", "--output", str(output), "--timeout", "300",
                           "--clip", str(tiny_clip(tmp_path / "clip"))])
    captured = capsys.readouterr()
    assert code == 0, captured.err + server.log_tail()
    lines = captured.out.splitlines()
    # Tiny random models paint no faces: every subject is missing in every picture, and auto regions find no one
    # (the sampler's warning, read from the server's log stream) and fall back to no regions.
    assert lines[2].startswith("| no regions | 2 | -1.000 | 0.000 | 0% | 100% | ") and lines[2].endswith(" | n/a |")
    assert lines[3].startswith("| regions | 2 | -1.000 | 0.000 | 0% | 100% | ") and lines[3].endswith(" | n/a |")
    assert lines[4].startswith("| auto regions | 2 | -1.000 | 0.000 | 0% | 100% | ") and lines[4].endswith(" | 100% |")
    scores = json.loads(output.read_text())
    assert all(0 <= s["clip"] <= 100 for s in scores)
    assert lines[2].split(" | ")[6] == f"{(scores[0]['clip'] + scores[3]['clip']) / 2:.2f}"
    assert [(s["setting"], s["seed"]) for s in scores] == [(setting, seed) for seed in (0, 1) for setting in benchmark.SETTINGS]
    assert [s["auto_regions_fell_back"] for s in scores] == [None, None, True] * 2
    assert all(s["similarity"] == [[], []] and s["seconds"] > 0 for s in scores)
