"""What the kit measures, in which order, in which worker, and how long each may take.

The budgets are for an H100-class GPU with 16 cores (the lent machines) and, tiny, for the rehearsal on a
shared 2-core CPU; a measurement past its budget is stopped and recorded as failed, and the run goes on.
Together they fit the GPU run into DEADLINE_S, under the 8 minutes one command gets there."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dev.gpu_kit.measurements import dynamic_vram, gpu_vs_cpu, host_work, official_noise, regions, speed

MEASUREMENTS = {
    "official-noise": official_noise,
    "speed": speed,
    "host-work": host_work,
    "regions": regions,
    "dynamic-vram": dynamic_vram,
    "gpu-vs-cpu": gpu_vs_cpu,
}
# seconds: on the GPU, and in the CPU rehearsal
BUDGETS_S = {
    "start": (90, 400),
    "official-noise": (30, 120),
    "speed": (170, 900),
    "host-work": (60, 400),
    "regions": (80, 600),
    "dynamic-vram": (60, 400),
    "gpu-vs-cpu": (90, 600),
}
DEADLINE_S = 450
LEAST_S = 15  # a measurement that would get less is not started

# Attention backends beside PyTorch's SDPA: ComfyUI's arguments for each (xformers is its default where it is
# installed), and the package that must be there.
OTHER_ATTENTION = {"xformers": ((), "xformers"), "sage": (("--use-sage-attention",), "sageattention"),
                   "flash": (("--use-flash-attention",), "flash_attn")}
PYTORCH_ATTENTION = "--use-pytorch-cross-attention"


@dataclass(frozen=True)
class Worker:
    label: str
    comfyui_arguments: tuple[str, ...]
    measurements: tuple[str, ...]


def workers(only: set[str] | None = None) -> list[Worker]:
    """The main worker (PyTorch's SDPA: NVIDIA's default without xformers) runs every measurement; one more
    worker per other attention backend installed here runs the regions measurement under it."""
    chosen = lambda names: tuple(name for name in names if only is None or name in only)
    planned = [Worker("PyTorch SDPA", (PYTORCH_ATTENTION,), chosen(MEASUREMENTS))]
    for label, (arguments, package) in OTHER_ATTENTION.items():
        if importlib.util.find_spec(package) is not None:
            planned.append(Worker(label, arguments, chosen(["regions"])))
    return [worker for worker in planned if worker.measurements]
