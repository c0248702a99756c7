"""The pack under ComfyUI's model patcher of this process (on NVIDIA: dynamic VRAM, ComfyUI's default) with LoRA
hooks on every prompt, a ControlNet and regions at once: three SNF Sampler runs of the pack's loaders' models
(tiny checkpoints in the official layout, written here), every load request, weight load and unload counted
per run, and every read of a checkpoint file (hooks need a non-dynamic copy of a dynamic model, which the
loaders rebuild from the file: once, not at every run)."""

from __future__ import annotations

import collections

import torch

from dev.benchmarks import regions as benchmark_regions
from dev.benchmarks.instruments import LoadSpy, UNetMeter

from . import Context, Result, Row

RUNS = 3
SETTINGS = dict(seed=5, steps=6, cfg=5.0, sampler_name="euler", scheduler="normal", alpha=0.34, beta=0.67, denoise=1.0)
CONTROL_STRENGTH = 0.3  # a random tiny ControlNet at full strength swamps the tiny UNet


def _model_folder(kind: str, folder):
    import folder_paths

    folder.mkdir(parents=True)
    folder_paths.add_model_folder_path(kind, str(folder))
    folder_paths.filename_list_cache.pop(kind, None)
    return folder


def _forget_folder(kind: str, folder) -> None:
    import folder_paths

    folder_paths.folder_names_and_paths[kind][0].remove(str(folder))
    folder_paths.filename_list_cache.pop(kind, None)


def _prompts(comfyui, clip, hooks, control, side: int) -> tuple[dict, torch.Tensor]:
    """Two subjects' prompts with regions, hooks on all three, a ControlNet on the SDM's pair."""
    encode = lambda text: comfyui.run("CLIPTextEncode", clip=clip, text=text)[0]
    conds = {"augmented": encode("a photo of a man and a woman, portrait"), "text": encode("a photo of a man and a woman"),
             "null": encode("")}
    conds, masks = benchmark_regions.region_setting(comfyui, conds, side)
    conds = {name: comfyui.run("ConditioningSetProperties", cond_NEW=cond, strength=1.0, set_cond_area="default", hooks=hooks)[0]
             for name, cond in conds.items()}
    net, hint = control
    conds["augmented"], conds["text"] = comfyui.run("ControlNetApplyAdvanced", positive=conds["augmented"], negative=conds["text"],
                                                    control_net=net, image=hint, strength=CONTROL_STRENGTH, start_percent=0.0,
                                                    end_percent=1.0)
    return conds, masks


def measure(context: Context) -> Result:
    import comfy.model_management
    import comfy.model_patcher
    from dev.devkit import official_checkpoints, tiny_comfy

    comfyui = context.comfyui
    side = 8 if context.tiny else 64
    checkpoints = _model_folder("facediffuser", context.scratch / "facediffuser")
    loras = _model_folder("loras", context.scratch / "loras")
    for name, refs in (("kit_tdm", official_checkpoints.build_tdm(0)), ("kit_sdm", official_checkpoints.build_sdm(1))):
        official_checkpoints.write_checkpoint(official_checkpoints.official_state_dict(refs), checkpoints / f"{name}.safetensors")
    loaders = comfyui.pack("nodes.loaders")
    reads: list[str] = []
    read_parts = loaders.read_parts
    loaders.read_parts = lambda node, path, *args: reads.append(path) or read_parts(node, path, *args)
    try:
        tdm, clip, _ = comfyui.run("FaceDiffuserTDMLoader", ckpt_name="kit_tdm.safetensors", weight_dtype="fp32")
        sdm = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="kit_sdm.safetensors", weight_dtype="fp32")[0]
        reads_loading = len(reads)
        tiny_comfy.write_lora(tdm, loras / "kit_hook.safetensors")
        (hooks,) = comfyui.run("CreateHookLora", lora_name="kit_hook.safetensors", strength_model=1.0, strength_clip=0.0)
        hint = torch.rand(1, side * 8, side * 8, 3, generator=torch.Generator().manual_seed(4))
        control = (tiny_comfy.controlnet(3, comfy.model_management.get_torch_device()), hint)
        conds, masks = _prompts(comfyui, clip, hooks, control, side)
        spy = LoadSpy({id(tdm.model): "TDM", id(sdm.model): "SDM"}, UNetMeter({}, context.device))  # load events only
        latent = {"samples": torch.zeros(1, 4, side, side)}
        settings = {key: value for key, value in SETTINGS.items() if key not in ("alpha", "beta")}
        samplers = {
            "snf": lambda: comfyui.run("FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, latent_image=latent, regions=masks, **SETTINGS, **conds),
            "ksampler": lambda: comfyui.nodes.common_ksampler(sdm, settings["seed"], settings["steps"], settings["cfg"],
                                                              settings["sampler_name"], settings["scheduler"], conds["augmented"],
                                                              conds["text"], latent),
        }
        runs = {}
        with spy.watching(type(tdm), type(sdm), comfy.model_patcher.ModelPatcher):
            for sampler, run in samplers.items():
                runs[sampler] = [_counted(run, spy, reads) for _ in range(RUNS)]
    finally:
        loaders.read_parts = read_parts
        _forget_folder("facediffuser", checkpoints)
        _forget_folder("loras", loras)
    patchers = {"TDM": type(tdm).__name__, "SDM": type(sdm).__name__}
    dynamic = {name: bool(getattr(model, "is_dynamic", lambda: False)()) for name, model in (("TDM", tdm), ("SDM", sdm))}
    per_run = lambda sampler, figure: "; ".join(figure(run) for run in runs[sampler])
    loads = lambda run: "/".join(f"{name} {count}" for name, count in sorted(run["weight_loads"].items())) or "none"
    row = lambda measure, figure, goal: Row(f"same: {measure} in runs 1-{RUNS}", per_run("snf", figure), per_run("ksampler", figure), "", goal)
    rows = [
        Row("dynamic VRAM with LoRA hooks on every prompt, a ControlNet and regions: the loaders' patchers (KSampler: the SDM "
            "alone, the same prompts, after them)",
            f"TDM {patchers['TDM']}, SDM {patchers['SDM']} (dynamic: {'yes' if all(dynamic.values()) else 'no'})", "", "", ""),
        row(f"checkpoint file reads (loading read {reads_loading})", lambda run: str(run["file_reads"]), "none after the first run"),
        row("load requests", lambda run: str(run["load_requests"]), "one per run"),
        row("weight loads (other: a non-dynamic copy or the ControlNet)", loads, "KSampler's, for both models"),
        row("weight unloads", lambda run: "/".join(f"{n} {c}" for n, c in sorted(run["unloads"].items())) or "none", "KSampler's, for both models"),
    ]
    return Result({"patchers": patchers, "dynamic": dynamic, "reads_while_loading": reads_loading, "runs": runs}, rows)


def _counted(run, spy: LoadSpy, reads: list[str]) -> dict:
    """One run's file reads and load events."""
    before = len(reads)
    spy.take()
    run()
    events = spy.take()
    moved = lambda kinds: dict(collections.Counter(model for e in events if e.kind in kinds for model in e.models))
    return {"file_reads": len(reads) - before, "load_requests": sum(e.kind == "load_models_gpu" for e in events),
            "weight_loads": moved({"load"}), "unloads": moved({"partial_unload", "offload"})}
