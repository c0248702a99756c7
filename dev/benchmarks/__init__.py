"""What the Face-diffuser SNF sampler costs on top of the UNet evaluations it has to run.

Face-diffuser evaluates a UNet more often than plain sampling: at the official 50 steps with the 15/30
split, 130 evaluations against KSampler's 100. That is the floor; everything the pack adds on top of it
(saliency maps, the per-pixel choice, model loading, Python work, host-device syncs) is overhead. This
benchmark measures that overhead against ComfyUI's own KSampler, in the same process, on two random-weight
models of SD1.5's architecture (the SDM and the TDM), and prints a Markdown table:

1. the SNF sampler at alpha = beta = 0 (the SDM alone: KSampler's evaluations exactly) against KSampler;
2. the three-stage run at the official split (alpha 0.32, beta 0.62) against the floor, KSampler's time
   times the evaluation ratio;
3. model loads and weight moves per run, and whether any happen between stages;
4. peak memory against the models' weights, each configuration in a fresh process;
5. with --device cuda: seconds per image, peak VRAM, host syncs per run, and the SNF maths per fusion
   step as a fraction of one UNet evaluation;
6. the host time outside the UNet per UNet evaluation, by stage, against KSampler's at the same steps, and
   the host reads of tensor values per run (each a host sync on a GPU). With --null-unet the UNets cost
   next to nothing (SD1.5's interface and latent, 512x512, 50 steps), so that this is all a run measures.
7. with --regions, instead of 1-6: the cost of per-subject regions (the SDM's cross-attention masked per
   subject), the same three-stage run for two subjects with and without two half-picture regions: UNet
   time per SDM row with regions against without, and UNet rows per step and stage (equal by design).

    COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks                # SD1.5-size UNets on CPU, 16x16 latent
    COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --quick        # small UNets of SD1.5's structure
    COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --device cuda  # SD1.5 size, 512x512, 50 steps, fp16
    COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --null-unet    # the host work per evaluation alone
    COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --regions --latent 64  # regions' cost at 512x512

How it measures. Every call of each model's `diffusion_model.forward` is wrapped: it is counted (calls,
rows, and the noise level, from which the step and stage of every row are derived after the run) and timed
(perf_counter on CPU; CUDA events on a GPU, read after the run, so the measuring adds no host sync). A run
therefore splits into time inside the UNet and time outside it, which holds everything the samplers and the
pack add. Wall times on a shared machine drift by 5-20% between identical runs, so the runs are interleaved
(KSampler, SNF at 0/0, SNF three-stage, repeated) and each ratio is the median of the per-repetition
ratios; next to it stands the same ratio with the UNet time of both sides set equal, which is what the
overhead alone does to the wall time and is far less noisy. Loads are counted by spying on
comfy.model_management.load_models_gpu and on the model patcher's load, partial unload and offload. Peak
memory is the kernel's high-water mark of the resident set (VmHWM, reset before sampling) and, on CUDA,
torch.cuda.max_memory_allocated, each in a fresh process holding only the models its sampler needs.

Run from the repository's root (PYTHONPATH=scripts finds the dev kit there). ComfyUI runs in this process,
started as the test suite starts it, by dev.devkit.comfy_harness (COMFYUI_PATH names the ComfyUI
checkout). One module per measurement: overhead (1-3, 5, 6), memory (4), regions (7); bench runs the samplers
under the instruments, report writes the tables, cli is the command line.
"""
