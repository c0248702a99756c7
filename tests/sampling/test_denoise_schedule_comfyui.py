"""One copy of KSampler's denoise rules (facediffuser_core.schedule.denoise_schedule) behind every node: the SNF
Sampler's (and Stage Sweep's) schedule is KSampler's own, and the PNDM Schedule node gives the SNF Sampler's
pndm_official schedule, for every step count and denoise, the edges included."""

from __future__ import annotations

import pytest
import torch

STEPS = (1, 7, 30, 50)
DENOISE = (1.0, 0.99995, 0.9999, 0.75, 0.33, 0.01, 0.0)


@pytest.mark.parametrize("denoise", DENOISE)
def test_every_node_schedules_as_ksampler(comfyui, models, denoise):
    import comfy.samplers

    _, sdm = models
    sampling = comfyui.pack("nodes.sampling")
    for steps in STEPS:
        for sampler, scheduler in (("euler", "normal"), ("ddim", "ddim_uniform"), ("dpm_2", "karras")):
            ksampler = comfy.samplers.KSampler(sdm, steps=steps, device=sdm.load_device, sampler=sampler, scheduler=scheduler,
                                               denoise=denoise)
            ours, whole = sampling.sampling_schedule("node", sdm, steps, sampler, scheduler, denoise)
            torch.testing.assert_close(ours, ksampler.sigmas, rtol=0, atol=0)
            assert (whole is None) == (denoise <= 0)
        if denoise > 0 and int(steps / denoise) > 1000:  # more than the official grid has (the next test)
            continue
        (pndm_node,) = comfyui.run("FaceDiffuserPNDMSchedule", model=sdm, steps=steps, denoise=denoise)
        torch.testing.assert_close(pndm_node, sampling.sampling_schedule("node", sdm, steps, "euler", "pndm_official", denoise)[0],
                                   rtol=0, atol=0)


def test_more_pndm_steps_than_timesteps_say_which_node_and_input(comfyui, models, conds):
    import types

    tdm, sdm = models
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    settings = dict(seed=0, cfg=5.0, alpha=0.3, beta=0.6, latent_image=latent, **conds)
    with pytest.raises(ValueError, match=r"^Face-diffuser SNF Sampler: the pndm_official scheduler has one step per training "
                                         r"timestep, at most 1000 in all, and steps 1001 asks for more .*Lower steps or choose"):
        comfyui.run("FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, steps=1001, sampler_name="euler", scheduler="pndm_official", **settings)
    with pytest.raises(ValueError, match=r"^Face-diffuser SNF Sampler: .* steps 600 at denoise 0.5 asks for more .*Lower steps, "
                                         r"raise denoise or choose another scheduler"):
        comfyui.run("FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, steps=600, sampler_name="euler", scheduler="pndm_official",
                    denoise=0.5, **settings)
    with pytest.raises(ValueError, match=r"^Face-diffuser PNDM Schedule \(official\): .* steps 30 at denoise 0.01 asks for more"):
        comfyui.run("FaceDiffuserPNDMSchedule", model=sdm, steps=30, denoise=0.01)
    # the PNDM sampler on another scheduler's longer schedule: no official grid to compare its start with
    sampler = comfyui.pack("nodes.official_run").PNDMSampler()
    sampling = sdm.get_model_object("model_sampling")
    model_wrap = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=sampling))
    long_schedule = torch.linspace(float(sampling.sigma_max), 0, 1502)
    assert sampler.max_denoise(model_wrap, long_schedule)
