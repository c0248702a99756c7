"""Face-diffuser's official algorithm written again on diffusers modules, as the tests' independent reference.

It follows SPEC.md: the official sampling loop, the three stages, SNF computed by tests/snf_reference.py in
float64 numpy. Nothing here calls into the pack. Two schedulers:
- `sample_official`: the official run exactly, on diffusers' PNDMScheduler (PLMS) as SD1.5 configures it,
  from latents = the noise itself (its initial noise sigma is 1), the stage split counting loop entries
  (`i <= start_merge_step` scene, `i <= final_step` fusion).
- `sample`: the same loop on DDIMScheduler, the scheduler the paper names, arranged to match ComfyUI's
  `ddim` sampler with the `ddim_uniform` scheduler (below), with the stage split by step index.

Matching ComfyUI's `ddim` sampler with the `ddim_uniform` scheduler:
- DDIMScheduler with "leading" spacing and steps_offset 1 gives the same timesteps (e.g. 901 ... 1 at 10
  steps), and with set_alpha_to_one its last step lands on alpha_bar = 1, i.e. sigma 0 as in ComfyUI.
- ComfyUI starts from noise * sigma_0 in its variance-exploding variable x / sqrt(alpha_bar); DDIM's
  variable is x itself, so the same noise enters here as noise * sqrt(1 - alpha_bar_0).
- ComfyUI's LATENT output is the final sample divided by SD1.5's latent scale 0.18215.
"""

from __future__ import annotations

import torch

from dev.devkit import comfy_harness

comfy_harness.register_cpu_torchvision_ops()  # diffusers imports torchvision

from diffusers import DDIMScheduler, PNDMScheduler  # noqa: E402

from snf_reference import reference_sdm_chosen  # noqa: E402

SD15_LATENT_SCALE = 0.18215
CLIP_TOKENS = 77


def ddim_scheduler(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    return scheduler


def initial_latents(noise: torch.Tensor, scheduler: DDIMScheduler) -> torch.Tensor:
    alpha_bar = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    return noise * torch.sqrt(1 - alpha_bar)


def pndm_scheduler(steps: int) -> PNDMScheduler:
    """SD1.5's default scheduler, as the official pipeline ran it."""
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def _three_stage_loop(scheduler, latents, tdm_unet, sdm_unet, augmented, text, null, cfg, stage_of):
    """The official loop over the scheduler's timesteps; `stage_of(i)` is "scene", "fusion" or "subject"
    for loop entry i. Returns the final latents and the SNF choices of the fusion entries."""
    choices = []

    def guided(unet, cond, uncond, t):
        eps_cond = unet(latents, t, encoder_hidden_states=cond).sample
        eps_uncond = unet(latents, t, encoder_hidden_states=uncond).sample
        response = cfg * (eps_cond - eps_uncond)
        return eps_uncond + response, response

    for i, t in enumerate(scheduler.timesteps):
        stage = stage_of(i)
        if stage == "scene":
            eps, _ = guided(tdm_unet, text, null, t)
        elif stage == "fusion":
            tdm_eps, tdm_response = guided(tdm_unet, text, null, t)
            sdm_eps, sdm_response = guided(sdm_unet, augmented, text, t)
            chosen = torch.from_numpy(reference_sdm_chosen(tdm_response.double().numpy(), sdm_response.double().numpy()))
            choices.append(chosen)
            eps = torch.where(chosen.unsqueeze(1), sdm_eps, tdm_eps)
        else:
            eps, _ = guided(sdm_unet, augmented, text, t)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents, choices


def sample(tdm_unet, sdm_unet, augmented, text, null, noise, steps, cfg, scene_end, fusion_end):
    """The three-stage loop on DDIM; conditionings are (B, T, D) hidden states. Returns what ComfyUI's
    LATENT output should hold, and the SNF choices per fusion step."""
    scheduler = ddim_scheduler(steps)

    def stage_of(i):
        return "scene" if i < scene_end else "fusion" if i < fusion_end else "subject"

    latents, choices = _three_stage_loop(scheduler, initial_latents(noise, scheduler), tdm_unet, sdm_unet,
                                         augmented, text, null, cfg, stage_of)
    return latents / SD15_LATENT_SCALE, choices


def official_initial_noise(shape, seed: int) -> torch.Tensor:
    """The official script's initial latent on a CPU: accelerate's set_seed(seed), then diffusers'
    randn_tensor with no generator (the global generator's first draw) in the pipeline's float16 (SPEC.md,
    Precision), returned in float32 as the pack samples."""
    from diffusers.utils.torch_utils import randn_tensor

    torch.manual_seed(seed)
    return randn_tensor(shape, generator=None, device=torch.device("cpu"), dtype=torch.float16).float()


def sample_official(tdm_unet, sdm_unet, augmented, text, null, noise, steps, cfg, start_merge_step, final_step):
    """The official run (SPEC.md, "The official run, exactly"): PNDM from latents = noise, loop entries up to
    start_merge_step scene construction, up to final_step fusion, the rest subject enhancement."""
    scheduler = pndm_scheduler(steps)

    def stage_of(i):
        return "scene" if i <= start_merge_step else "fusion" if i <= final_step else "subject"

    latents, choices = _three_stage_loop(scheduler, noise * scheduler.init_noise_sigma, tdm_unet, sdm_unet,
                                         augmented, text, null, cfg, stage_of)
    return latents / SD15_LATENT_SCALE, choices


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def official_face_pixels(pixels: torch.Tensor, object_resolution: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's preprocessing with torchvision's tensor transforms, the official code's library.
    (3, H, W) uint8 -> CLIP input (3, 224, 224) and the object image (3, R, R) in [0, 1]."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    height, width = pixels.shape[1:]
    pad = abs(height - width) // 2
    padded = T.functional.pad(pixels, [pad, 0] if height > width else [0, pad])
    resize = T.Resize((object_resolution, object_resolution), InterpolationMode.BILINEAR, antialias=True)
    object_image = T.ConvertImageDtype(torch.float)(resize(padded))
    clip_input = T.Normalize(CLIP_MEAN, CLIP_STD)(T.Resize((224, 224), InterpolationMode.BILINEAR, antialias=True)(object_image))
    return clip_input, object_image


def encode_official_prompt(tokenizer, text_encoder, postfuse_weights, prompt: str, face_embeddings: torch.Tensor):
    """FastComposer's prompt handling from SPEC.md: `<|image|>` is a token of its own; the marked token is
    the one before it; the markers are dropped and the ids padded to 77. Returns (augmented, text) hidden states."""
    from spec_postfuse import spec_postfuse

    marker = "<|image|>"
    tokenizer.add_tokens([marker], special_tokens=True)
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    ids, marked_rows = [], []
    for token in tokenizer(prompt).input_ids:
        if token == marker_id:
            marked_rows.append(len(ids) - 1)
        else:
            ids.append(token)
    ids += [tokenizer.pad_token_id] * (CLIP_TOKENS - len(ids))
    with torch.no_grad():
        text = text_encoder(torch.tensor([ids])).last_hidden_state
        augmented = text.clone()
        for row, face in zip(marked_rows, face_embeddings):
            augmented[0, row] = spec_postfuse(postfuse_weights, text[0, row], face)
    return augmented, text
