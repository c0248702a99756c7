"""Face-diffuser inside the graphs artists build around it (ComfyUI tier, CPU, tiny random models): ControlNet,
LoRA hooks, TorchCompileModel, CFG++ samplers, Differential Diffusion, caches and other wrappers, split and cut
schedules, and ComfyUI's default NVIDIA patcher (dynamic VRAM) as far as a CPU can show it (tests/dynamic_vram.py).

Most checks compare with core's KSampler: at alpha = beta = 1 the SNF sampler is KSampler with the TDM (text
against null), at alpha = beta = 0 KSampler with the SDM (augmented against text), so whatever a node does to a
KSampler run it must do to those runs too."""

from __future__ import annotations

import re

import pytest
import torch

from dev.devkit import official_checkpoints as oc
from dev.devkit import tiny_comfy

SEED = 5
SETTINGS = dict(steps=6, cfg=5.0, sampler_name="euler", scheduler="normal", alpha=0.34, beta=0.67, denoise=1.0)
TIGHT = dict(rtol=1e-5, atol=1e-5)


def snf(comfyui, tdm, sdm, conds, latent=None, **settings):
    settings = {**SETTINGS, **settings}
    return comfyui.run("FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, latent_image=latent or tiny_comfy.empty_latent(),
                       seed=SEED, **conds, **settings)


def ksampler(comfyui, model, positive, negative, latent=None, **settings):
    s = {**SETTINGS, **settings}
    return comfyui.nodes.common_ksampler(model, SEED, s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], positive, negative,
                                         latent or tiny_comfy.empty_latent(), denoise=s["denoise"])[0]["samples"]


def assert_extremes_are_ksampler(comfyui, tdm, sdm, conds, latent=None, ksampler_tdm=None, ksampler_sdm=None, **settings):
    """The SNF sampler at alpha = beta = 1 and 0 against KSampler with the TDM (text vs null) and with the SDM
    (augmented vs text); `ksampler_tdm` / `ksampler_sdm` are the (positive, negative) a KSampler user would wire
    where they differ from the SNF sampler's inputs."""
    tdm_only, _ = snf(comfyui, tdm, sdm, conds, latent, **{**settings, "alpha": 1.0, "beta": 1.0})
    positive, negative = ksampler_tdm or (conds["text"], conds["null"])
    torch.testing.assert_close(tdm_only["samples"], ksampler(comfyui, tdm, positive, negative, latent, **settings), **TIGHT)
    sdm_only, _ = snf(comfyui, tdm, sdm, conds, latent, **{**settings, "alpha": 0.0, "beta": 0.0})
    positive, negative = ksampler_sdm or (conds["augmented"], conds["text"])
    torch.testing.assert_close(sdm_only["samples"], ksampler(comfyui, sdm, positive, negative, latent, **settings), **TIGHT)
    return tdm_only["samples"], sdm_only["samples"]


class UNetCalls:
    """Records a model's UNet calls (sigma, rows, which rows are cond/uncond) through a unet wrapper on a clone;
    `replace_uncond` makes the unconditional rows' denoised prediction a constant, so that tests can tell
    which model's unconditional prediction ends up where."""

    def __init__(self, patcher, replace_uncond: float | None = None):
        self.patcher = patcher.clone()
        self.calls = []
        self.replace_uncond = replace_uncond
        self.patcher.set_model_unet_function_wrapper(self._wrapper)

    def _wrapper(self, apply_model, args):
        self.calls.append((float(args["timestep"][0]), args["input"].shape[0], list(args["cond_or_uncond"])))
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if self.replace_uncond is not None:
            chunks = list(out.chunk(len(args["cond_or_uncond"])))
            for index, kind in enumerate(args["cond_or_uncond"]):
                if kind == 1:
                    chunks[index] = torch.full_like(chunks[index], self.replace_uncond)
            out = torch.cat(chunks)
        return out


# --- ControlNet ---------------------------------------------------------------------------------------------


CONTROL_STRENGTH = 0.3  # a random tiny ControlNet at full strength swamps the tiny UNet


@pytest.fixture(scope="module")
def control(comfyui):
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    return tiny_comfy.controlnet(3), hint


def apply_advanced(comfyui, positive, negative, control):
    net, hint = control
    return comfyui.run("ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=net, image=hint,
                       strength=CONTROL_STRENGTH, start_percent=0.0, end_percent=1.0)


@pytest.mark.parametrize("wiring", ["augmented+text", "text+null", "text only (Apply ControlNet, old)"])
def test_a_controlnet_on_the_prompt_acts_on_both_branches_of_both_models(comfyui, models, conds, control, wiring):
    tdm, sdm = models
    if wiring == "augmented+text":
        augmented, text = apply_advanced(comfyui, conds["augmented"], conds["text"], control)
        wired = dict(conds, augmented=augmented, text=text)
    elif wiring == "text+null":
        text, null = apply_advanced(comfyui, conds["text"], conds["null"], control)
        wired = dict(conds, text=text, null=null)
    else:
        net, hint = control
        (text,) = comfyui.run("ControlNetApply", conditioning=conds["text"], control_net=net, image=hint, strength=CONTROL_STRENGTH)
        wired = dict(conds, text=text)
    # What a KSampler user wires: Apply ControlNet on the positive and the negative of each model.
    tdm_only, _ = assert_extremes_are_ksampler(
        comfyui, tdm, sdm, wired, ksampler_tdm=apply_advanced(comfyui, conds["text"], conds["null"], control),
        ksampler_sdm=apply_advanced(comfyui, conds["augmented"], conds["text"], control))
    assert not torch.allclose(tdm_only, ksampler(comfyui, tdm, conds["text"], conds["null"]), atol=1e-3)  # the control acts

    # Both branches of each model carry the same control, so each model evaluates them in one UNet batch.
    tdm_calls, sdm_calls = UNetCalls(tdm), UNetCalls(sdm)
    snf(comfyui, tdm_calls.patcher, sdm_calls.patcher, wired)
    assert all(rows == 2 and sorted(kinds) == [0, 1] for _, rows, kinds in tdm_calls.calls + sdm_calls.calls)


# --- LoRA hooks and the dynamic-VRAM patcher ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_hooks(comfyui, models, tmp_path_factory):
    """Create Hook LoRA on a LoRA file (ComfyUI's full-difference format) for the tiny UNets' output conv."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    tiny_comfy.write_lora(models[0], folder / "tiny_hook.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder))
    folder_paths.filename_list_cache.pop("loras", None)
    (hooks,) = comfyui.run("CreateHookLora", lora_name="tiny_hook.safetensors", strength_model=1.0, strength_clip=0.0)
    return hooks


def hooked(comfyui, conditioning, hooks):
    (out,) = comfyui.run("ConditioningSetProperties", cond_NEW=conditioning, strength=1.0, set_cond_area="default", hooks=hooks)
    return out


def test_lora_hook_groups_on_the_prompts_act_as_in_ksampler(comfyui, models, conds, lora_hooks):
    tdm, sdm = models
    wired = {name: hooked(comfyui, c, lora_hooks) for name, c in conds.items()}
    tdm_only, _ = assert_extremes_are_ksampler(comfyui, tdm, sdm, wired)
    assert not torch.allclose(tdm_only, ksampler(comfyui, tdm, conds["text"], conds["null"]), atol=1e-3)
    three_stage, _ = snf(comfyui, tdm, sdm, wired)
    assert torch.isfinite(three_stage["samples"]).all()
    # The hooks are removed again after sampling: unhooked prompts give the unhooked result.
    again, _ = snf(comfyui, tdm, sdm, conds, alpha=1.0, beta=1.0)
    torch.testing.assert_close(again["samples"], ksampler(comfyui, tdm, conds["text"], conds["null"]), **TIGHT)


def dynamic_patcher(seed: int):
    """A tiny model under the dynamic-VRAM stand-in, rebuilt as a classic patcher when asked for one."""
    import dynamic_vram

    def build(disable_dynamic=False):
        classic = tiny_comfy.sd15_patcher(seed)
        if disable_dynamic:
            return classic
        patcher = dynamic_vram.CpuDynamicPatcher(classic.model, load_device=classic.load_device, offload_device=classic.offload_device)
        patcher.cached_patcher_init = (build, ())
        return patcher

    return build()


@pytest.mark.parametrize("hooked_inputs, swapped", [
    (("null",), {"tdm"}), (("text",), {"tdm", "sdm"}), (("augmented",), {"sdm"}), (("augmented", "text", "null"), {"tdm", "sdm"}),
])
def test_hooked_prompts_on_dynamic_vram_models_use_non_dynamic_delegates(comfyui, models, conds, lora_hooks, hooked_inputs, swapped):
    """CFGGuider swaps a dynamic patcher for its non-dynamic delegate when its conditionings carry hooks (the
    dynamic one refuses hooks); each side must do so for its own two conditionings: hooks on `null` alone
    reach only the TDM."""
    wired = {name: hooked(comfyui, c, lora_hooks) if name in hooked_inputs else c for name, c in conds.items()}
    guider, _ = comfyui.run("FaceDiffuserGuider", tdm=dynamic_patcher(1), sdm=dynamic_patcher(2), cfg=5.0, alpha=0.34, beta=0.67, **wired)
    assert {side.name for side in guider.sides if not side.model_patcher.is_dynamic()} == swapped
    assert guider.model_patcher is guider.sdm_side.model_patcher
    if swapped == {"tdm", "sdm"}:  # sampled where no dynamic patcher is left: the stand-in does not load like one
        out, _ = snf(comfyui, dynamic_patcher(1), dynamic_patcher(2), wired)
        expected, _ = snf(comfyui, *models, wired)
        torch.testing.assert_close(out["samples"], expected["samples"], **TIGHT)


def test_hooks_on_a_dynamic_model_without_a_rebuild_recipe_say_why(comfyui, conds, lora_hooks):
    tdm = dynamic_patcher(1)
    tdm.cached_patcher_init = None
    with pytest.raises(RuntimeError, match="Cannot create non-dynamic delegate"):
        comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=dynamic_patcher(2), cfg=5.0, alpha=0.34, beta=0.67,
                    **dict(conds, null=hooked(comfyui, conds["null"], lora_hooks)))


# --- the pack's loaders under the dynamic-VRAM patcher -----------------------------------------------------------


@pytest.fixture(scope="module")
def dynamic_loaded(comfyui, tmp_path_factory):
    """The pack's loaders on tiny official files while ComfyUI's default patcher is the dynamic one."""
    import dynamic_vram
    import folder_paths

    folder = tmp_path_factory.mktemp("facediffuser")
    oc.write_checkpoint(oc.official_state_dict(oc.build_tdm(0)), folder / "tdm.safetensors")
    oc.write_checkpoint(oc.official_state_dict(oc.build_sdm(1)), folder / "sdm.safetensors")
    folder_paths.add_model_folder_path("facediffuser", str(folder))
    with dynamic_vram.as_default_patcher():
        tdm = comfyui.run("FaceDiffuserTDMLoader", ckpt_name="tdm.safetensors", weight_dtype="fp32")
        sdm = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="sdm.safetensors", weight_dtype="fp32")
    yield {"tdm": tdm, "sdm": sdm}
    folder_paths.folder_names_and_paths["facediffuser"][0].remove(str(folder))


def test_loaders_rebuild_each_network_as_a_classic_patcher_like_core_loaders(comfyui, dynamic_loaded):
    import comfy.model_patcher

    model, clip, vae = dynamic_loaded["tdm"]
    for patcher in (model, clip.patcher, vae.patcher):
        assert patcher.is_dynamic()
        function, args = patcher.cached_patcher_init
        rebuilt = function(*args, disable_dynamic=True)
        assert type(rebuilt) is comfy.model_patcher.ModelPatcher
        original, fresh = patcher.model.state_dict(), rebuilt.model.state_dict()
        assert original.keys() == fresh.keys()
        # The official text encoder has no projection, which SD1.5 never uses: ComfyUI leaves it uninitialised.
        checked = [key for key in original if not key.endswith("text_projection.weight")]
        assert len(checked) >= len(original) - 1
        assert all(torch.equal(original[key], fresh[key]) for key in checked)
    delegate = model.clone(disable_dynamic=True)
    assert not delegate.is_dynamic() and delegate.model is not model.model


class CountingCompile:
    """Stands in for torch.compile (whose inductor build of even a tiny UNet takes minutes on a CPU): the
    "compiled" module is the module itself, counting its calls, so a test sees where TorchCompileModel's
    wrapper put it to work."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, **kwargs):
        counter = self

        class Compiled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, *args, **kwargs):
                counter.calls += 1
                return self.inner(*args, **kwargs)

            def __getattr__(self, name):  # as torch's compiled modules do, for attributes callers read (dtype, ...)
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.inner, name)

        return Compiled()


def test_torch_compile_set_clip_hooks_and_hooked_prompts_with_the_packs_dynamic_models(comfyui, dynamic_loaded, lora_hooks, monkeypatch):
    """TorchCompileModel and Set CLIP Hooks ask for a non-dynamic copy (clone(disable_dynamic=True)), which needs
    the loaders' cached_patcher_init; the hooked prompts then make both sides swap to their delegates."""
    tdm, clip, _ = dynamic_loaded["tdm"]
    sdm = dynamic_loaded["sdm"][0]
    compile_spy = CountingCompile()
    monkeypatch.setattr(torch, "compile", compile_spy)
    (compiled_tdm,) = comfyui.run("TorchCompileModel", model=tdm, backend="inductor")
    assert not compiled_tdm.is_dynamic()
    (hooked_clip,) = comfyui.run("SetClipHooks", clip=clip, apply_to_conds=True, schedule_clip=False, hooks=lora_hooks)
    assert not hooked_clip.patcher.is_dynamic()
    prompts = {name: comfyui.run("CLIPTextEncode", clip=hooked_clip, text=text)[0]
               for name, text in (("augmented", "a photo of a man"), ("text", "a photo of a man"), ("null", ""))}
    assert all("hooks" in c[0][1] for c in prompts.values())
    tdm_calls = UNetCalls(compiled_tdm)
    out, saliency = snf(comfyui, tdm_calls.patcher, sdm, prompts, steps=3, alpha=0.34, beta=0.67)
    assert torch.isfinite(out["samples"]).all() and saliency.steps == [1]
    assert compile_spy.calls == len(tdm_calls.calls) == 2  # the compiled UNet ran the TDM's evaluations, and only those


def region_inputs(comfyui, prompts: dict, regions: str | None) -> tuple[dict, dict]:
    """The prompts with two subjects recorded in 'augmented' (at rows 2 and 4), and the sampling nodes' inputs for
    given regions (two halves) or auto regions (two faces found); without regions, both as they are."""
    if regions is None:
        return prompts, {}
    from test_auto_regions_comfyui import setup

    core = comfyui.pack("facediffuser_core.regions")
    augmented, options = prompts["augmented"][0]
    rows = (2, 4)
    subjects = core.SubjectTokens(rows, augmented.shape[1], prompts["text"][0][0][0, list(rows)].clone())
    prompts = dict(prompts, augmented=[[augmented, {**options, core.SUBJECTS_KEY: subjects}]])
    if regions == "auto":
        return prompts, {"auto_regions": setup(comfyui, [(40.0, 8.0, 56.0, 24.0), (8.0, 8.0, 24.0, 24.0)])[0]}
    return prompts, {"regions": comfyui.run("FaceDiffuserRegionLayout", layout="halves", subjects=2, width=64, height=64, boxes="")[0]}


@pytest.mark.parametrize("regions", [None, "given", "auto"])
def test_hooked_prompts_rebuild_each_dynamic_model_once_across_runs_and_a_sweep(comfyui, dynamic_loaded, lora_hooks, monkeypatch, regions):
    """Core keeps a dynamic model's non-dynamic delegate on the node's patcher (the loader's output), so a
    KSampler with hooked prompts reads the file once while ComfyUI holds the model; so must every SNF Sampler run
    and every Stage Sweep cell, with regions too (the SDM side patches its own copy, never the node's patcher)."""
    loaders = comfyui.pack("nodes.loaders")
    reads = []
    read_parts = loaders.read_parts
    monkeypatch.setattr(loaders, "read_parts", lambda node, path, *args: reads.append(path) or read_parts(node, path, *args))
    (tdm, clip, _), (sdm, *_) = dynamic_loaded["tdm"], dynamic_loaded["sdm"]
    prompts = {name: hooked(comfyui, comfyui.run("CLIPTextEncode", clip=clip, text=text)[0], lora_hooks)
               for name, text in (("augmented", "a photo of a man"), ("text", "a photo of a man"), ("null", ""))}
    prompts, inputs = region_inputs(comfyui, prompts, regions)
    snf(comfyui, tdm, sdm, prompts, steps=3, **inputs)
    first_run = list(reads)  # the delegates built now, unless an earlier test of this module's models built them
    snf(comfyui, tdm, sdm, prompts, steps=3, **inputs)
    comfyui.run("FaceDiffuserStageSweep", tdm=tdm, sdm=sdm, latent_image=tiny_comfy.empty_latent(), seed=SEED, alphas="0.34",
                betas="0.34, 0.67", **{key: value for key, value in SETTINGS.items() if key not in ("alpha", "beta", "steps")},
                steps=3, **prompts, **inputs)
    assert reads == first_run and len(set(reads)) == len(reads)
    assert set(reads) <= {tdm.cached_patcher_init[1][1], sdm.cached_patcher_init[1][1]}


# --- CFG++ samplers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("sampler_name", ["euler_cfg_pp", "res_multistep_cfg_pp"])
def test_cfg_pp_samplers_match_ksampler_at_cfg_1_and_3(comfyui, models, conds, sampler_name, cfg):
    tdm, sdm = models
    tdm_only, sdm_only = assert_extremes_are_ksampler(comfyui, tdm, sdm, conds, sampler_name=sampler_name, cfg=cfg)
    out, _ = snf(comfyui, tdm, sdm, conds, sampler_name=sampler_name, cfg=cfg)
    scale = max(tdm_only.abs().max(), sdm_only.abs().max())
    assert torch.isfinite(out["samples"]).all() and out["samples"].abs().max() < 2 * scale


def test_in_the_fusion_stage_a_sampler_sees_each_pixels_unconditional_prediction_from_the_model_snf_chose(comfyui, models, conds):
    """cfg++ samplers read the unconditional prediction through a post-cfg function; in the fusion stage it
    must be, pixel by pixel, that of the model whose prediction SNF took."""
    import comfy.k_diffusion.sampling
    import comfy.model_patcher
    import comfy.samplers

    seen = []

    def capturing_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        def post_cfg(args):
            seen.append((float(args["sigma"][0]), args["uncond_denoised"]))
            return args["denoised"]

        extra_args = dict(extra_args)
        extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
            extra_args["model_options"].copy(), post_cfg, disable_cfg1_optimization=True)
        return comfy.k_diffusion.sampling.sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)

    tdm, sdm = UNetCalls(models[0], replace_uncond=-1.0), UNetCalls(models[1], replace_uncond=2.0)
    (guider, saliency) = comfyui.run("FaceDiffuserGuider", tdm=tdm.patcher, sdm=sdm.patcher, cfg=3.0, alpha=0.34, beta=0.67, **conds)
    sigmas = comfyui.run("BasicScheduler", model=models[1], scheduler="normal", steps=6, denoise=1.0)[0]
    comfyui.run("SamplerCustomAdvanced", noise=comfyui.run("RandomNoise", noise_seed=SEED)[0], guider=guider,
                sampler=comfy.samplers.KSAMPLER(capturing_euler), sigmas=sigmas, latent_image=tiny_comfy.empty_latent())
    assert len(seen) == 6 and saliency.steps == [2, 3]
    for (_, uncond), step in zip(seen, range(6)):
        if step < 2:
            assert torch.all(uncond == -1.0)
        elif step >= 4:
            assert torch.all(uncond == 2.0)
        else:
            chosen = saliency.decisions[step - 2].sdm_chosen.unsqueeze(1).expand_as(uncond)
            assert torch.equal(uncond, torch.where(chosen, torch.tensor(2.0), torch.tensor(-1.0)))
            assert 0 < chosen.float().mean() < 1


# --- Differential Diffusion, caches and wrappers ---------------------------------------------------------------


def masked_latent():
    generator = torch.Generator().manual_seed(9)
    mask = torch.linspace(0, 1, 64).repeat(64, 1).unsqueeze(0)
    return {"samples": torch.randn(1, 4, 8, 8, generator=generator), "noise_mask": mask}


@pytest.mark.parametrize("patched", ["tdm", "sdm", "both"])
def test_differential_diffusion_acts_from_either_model(comfyui, models, conds, patched):
    tdm, sdm = models
    (diff_tdm,) = comfyui.run("DifferentialDiffusion", model=tdm, strength=1.0)
    (diff_sdm,) = comfyui.run("DifferentialDiffusion", model=sdm, strength=1.0)
    use_tdm = diff_tdm if patched in ("tdm", "both") else tdm
    use_sdm = diff_sdm if patched in ("sdm", "both") else sdm
    latent = masked_latent()
    tdm_only, _ = snf(comfyui, use_tdm, use_sdm, conds, latent, alpha=1.0, beta=1.0, denoise=0.8)
    torch.testing.assert_close(tdm_only["samples"], ksampler(comfyui, diff_tdm, conds["text"], conds["null"], latent, denoise=0.8), **TIGHT)
    sdm_only, _ = snf(comfyui, use_tdm, use_sdm, conds, latent, alpha=0.0, beta=0.0, denoise=0.8)
    torch.testing.assert_close(sdm_only["samples"], ksampler(comfyui, diff_sdm, conds["augmented"], conds["text"], latent, denoise=0.8), **TIGHT)
    assert not torch.allclose(tdm_only["samples"], ksampler(comfyui, tdm, conds["text"], conds["null"], latent, denoise=0.8), atol=1e-4)


def test_each_models_wrappers_wrap_only_its_own_work(comfyui, models, conds):
    import comfy.patcher_extension as pe
    import comfy.samplers

    seen = {"tdm": [], "sdm": []}
    patched = {}
    for name, patcher in zip(("tdm", "sdm"), models):
        def predict_noise(executor, x, timestep, model_options, seed, name=name, model=patcher.model):
            assert executor.class_obj.model_patcher.model is model
            seen[name].append(("predict_noise", float(timestep[0])))
            return executor(x, timestep, model_options, seed)

        def outer_sample(executor, *args, name=name, model=patcher.model, **kwargs):
            assert executor.class_obj.model_patcher.model is model
            seen[name].append(("outer_sample",))
            return executor(*args, **kwargs)

        def sampler_sample(executor, guider, sigmas, extra_args, *args, name=name, model=patcher.model, **kwargs):
            assert guider.model_patcher.model is model and "facediffuser_test" in extra_args["model_options"]["transformer_options"]
            seen[name].append(("sampler_sample",))
            return executor(guider, sigmas, extra_args, *args, **kwargs)

        def calc_cond_batch(args, name=name, model=patcher.model):
            assert args["model"] is model
            seen[name].append(("calc_cond_batch", float(args["sigma"][0])))
            return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])

        clone = patcher.clone()
        clone.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
        clone.model_options["transformer_options"]["facediffuser_test"] = name
        clone.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, "test", predict_noise)
        clone.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "test", outer_sample)
        clone.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, "test", sampler_sample)
        patched[name] = clone
    _, saliency = snf(comfyui, patched["tdm"], patched["sdm"], conds)
    sigmas = comfyui.run("BasicScheduler", model=models[1], scheduler="normal", steps=6, denoise=1.0)[0].tolist()
    for name, steps in (("tdm", range(0, 4)), ("sdm", range(2, 6))):
        assert seen[name][:2] == [("outer_sample",), ("sampler_sample",)]
        # Each evaluation of a model: its PREDICT_NOISE wrapper, then its own cond-batch function.
        assert seen[name][2:] == [event for i in steps for event in (("predict_noise", sigmas[i]), ("calc_cond_batch", sigmas[i]))]


def test_easycache_on_the_tdm_and_lazycache_on_the_sdm(comfyui, models, conds, caplog):
    """Each cache's OUTER_SAMPLE wrapper prepares it on its own model's side, and each caches its own model's
    evaluations: LazyCache (which skips whole predictions) on the SDM never sees the TDM-only steps."""
    tdm, sdm = models
    (cached_tdm,) = comfyui.run("EasyCache", model=tdm, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)
    (cached_sdm,) = comfyui.run("LazyCache", model=sdm, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)
    sdm_calls = UNetCalls(cached_sdm)
    with caplog.at_level("INFO"):
        out, saliency = snf(comfyui, cached_tdm, sdm_calls.patcher, conds, steps=10, alpha=0.3, beta=0.6)
    assert torch.isfinite(out["samples"]).all() and saliency.steps == [3, 4, 5]
    assert "EasyCache enabled" in caplog.text and "LazyCache enabled" in caplog.text
    skipped = {name: int(count) for name, count in re.findall(r"(EasyCache|LazyCache) - skipped (\d+)/", caplog.text)}
    assert skipped["EasyCache"] > 0 and skipped["LazyCache"] > 0
    assert len(sdm_calls.calls) == 7 - skipped["LazyCache"]  # of the SDM's 7 evaluations


# --- schedules --------------------------------------------------------------------------------------------------


def test_stages_sit_on_the_real_full_schedule_of_ddim_uniform_with_denoise(comfyui, models, conds):
    """ddim_uniform makes more steps than asked (60 -> 63 here): denoise 0.5 of 30 steps runs the last 30 of the
    63, and alpha/beta are fractions of those 63."""
    import comfy.samplers

    tdm, sdm = models
    tdm_calls, sdm_calls = UNetCalls(tdm), UNetCalls(sdm)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    _, saliency = snf(comfyui, tdm_calls.patcher, sdm_calls.patcher, conds, latent, steps=30, denoise=0.5,
                      sampler_name="ddim", scheduler="ddim_uniform", alpha=0.5, beta=0.7)
    full = comfy.samplers.calculate_sigmas(sdm.get_model_object("model_sampling"), "ddim_uniform", 60).tolist()
    assert len(full) - 1 == 63
    scene_end, fusion_end = round(0.5 * 63), round(0.7 * 63 + 1e-9)  # 32 (half up) and 44
    assert saliency.steps == list(range(33, fusion_end))  # the run starts at step 63 - 30 = 33
    assert [s for s, _, _ in tdm_calls.calls] == full[33:fusion_end]
    assert [s for s, _, _ in sdm_calls.calls] == full[33:63]
    assert scene_end < 33


def test_denoise_zero_returns_the_latent_unchanged_like_ksampler(comfyui, models, conds):
    tdm, sdm = models
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    out, saliency = snf(comfyui, tdm, sdm, conds, latent, denoise=0.0)
    assert torch.equal(out["samples"], latent["samples"]) and len(saliency) == 0
    assert torch.equal(out["samples"], ksampler(comfyui, tdm, conds["text"], conds["null"], latent, denoise=0.0))


def run_custom(comfyui, guider, sigmas, latent, noise=None):
    noise = noise or comfyui.run("RandomNoise", noise_seed=SEED)[0]
    return comfyui.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=comfyui.run("KSamplerSelect", sampler_name="euler")[0],
                       sigmas=sigmas, latent_image=latent)[0]


def test_split_sigmas_halves_through_two_samplers_equal_one_full_run(comfyui, models, conds):
    tdm, sdm = models
    sigmas = comfyui.run("BasicScheduler", model=sdm, scheduler="normal", steps=6, denoise=1.0)[0]
    full_guider, full_saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.34, beta=0.67, **conds)
    whole = run_custom(comfyui, full_guider, sigmas, tiny_comfy.empty_latent())
    assert full_saliency.steps == [2, 3]

    high, low = comfyui.run("SplitSigmas", sigmas=sigmas, step=3)
    guider, saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.34, beta=0.67, schedule=sigmas, **conds)
    first = run_custom(comfyui, guider, high, tiny_comfy.empty_latent())
    assert saliency.steps == [2]
    second = run_custom(comfyui, guider, low, first, noise=comfyui.run("DisableNoise")[0])
    assert saliency.steps == [3]
    torch.testing.assert_close(second["samples"], whole["samples"], rtol=1e-5, atol=1e-5)

    # A one-sigma tail (SplitSigmas at the last step) samples nothing, as with core's guiders.
    _, tail = comfyui.run("SplitSigmas", sigmas=sigmas, step=6)
    assert torch.equal(run_custom(comfyui, guider, tail, first, noise=comfyui.run("DisableNoise")[0])["samples"], first["samples"])


def test_a_schedule_the_sigmas_are_not_part_of_is_refused(comfyui, models, conds):
    tdm, sdm = models
    sigmas = comfyui.run("BasicScheduler", model=sdm, scheduler="normal", steps=6, denoise=1.0)[0]
    other = comfyui.run("BasicScheduler", model=sdm, scheduler="karras", steps=6, denoise=1.0)[0]
    guider, _ = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.34, beta=0.67, schedule=other, **conds)
    with pytest.raises(ValueError, match="Face-diffuser Guider: the sampler's sigmas include .* not on the 'schedule' input"):
        run_custom(comfyui, guider, sigmas, tiny_comfy.empty_latent())


# --- errors -------------------------------------------------------------------------------------------------------


def test_a_latent_of_another_model_family_names_the_node_and_the_fix(comfyui, models, conds):
    tdm, sdm = models
    sd3_latent = {"samples": torch.randn(2, 16, 8, 12)}
    with pytest.raises(ValueError, match=r"Face-diffuser SNF Sampler: the latent is a latent of shape \(2, 16, 8, 12\).*"
                                         r"take \(batch, 4, height/8, width/8\).*Empty Latent Image or VAE Encode"):
        snf(comfyui, tdm, sdm, conds, sd3_latent)
    guider, _ = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, **conds)
    sigmas = comfyui.run("BasicScheduler", model=sdm, scheduler="normal", steps=3, denoise=1.0)[0]
    with pytest.raises(ValueError, match="Face-diffuser Guider: the latent is a latent of shape"):
        run_custom(comfyui, guider, sigmas, sd3_latent)
