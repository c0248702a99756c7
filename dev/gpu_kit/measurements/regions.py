"""What per-subject regions cost per SDM row under this process's attention backend: the benchmark's --regions
mode (two subjects, two half-picture regions, the official split, with and without them), at 512x512, 50
steps, fp16 on a GPU. The kit runs it once per backend present (PyTorch's SDPA always)."""

from __future__ import annotations

from dev.benchmarks import cli
from dev.benchmarks import regions as benchmark_regions
from dev.benchmarks.bench import Bench
from dev.benchmarks.models import DTYPES, SDM, TDM

from . import Context, Result, Row

TINY = ("--tiny",)


def attention_backend() -> str:
    """The attention function ComfyUI chose at start-up (from main.py's flags and what is installed)."""
    import comfy.ldm.modules.attention as attention

    function = attention.optimized_attention
    return getattr(function, "__name__", repr(function))


def measure(context: Context) -> Result:
    args, preset = cli.parse_arguments(context.benchmark_arguments("--regions", tiny=TINY))
    bench = Bench(context.comfyui, preset.unet_config, DTYPES[preset.dtype], context.device)
    timing = benchmark_regions.regions_timing(bench, preset.steps, preset.latent_side, preset.repeats, context.log)
    s = timing["summary"]
    backend = attention_backend()
    seconds = lambda value: f"{value * 1000:.2f} ms"
    single = s["one_call"]
    rows = [
        Row(f"regions ({backend}): SDM UNet time per row, one-call runs in pairs", seconds(single["regions_s_per_row"]),
            seconds(single["plain_s_per_row"]), f"{single['ratio']:.3f}", "<= 1.03"),
        Row(f"regions ({backend}): SDM UNet time per row, three-stage runs", seconds(s[SDM]["regions_s_per_row"]),
            seconds(s[SDM]["plain_s_per_row"]), f"{s[SDM]['ratio']:.3f}", "<= 1.03"),
        Row(f"regions ({backend}): TDM, identical work (the measurement's noise)", seconds(s[TDM]["regions_s_per_row"]),
            seconds(s[TDM]["plain_s_per_row"]), f"{s[TDM]['ratio']:.3f}", "1"),
        Row(f"regions ({backend}): UNet rows per step and stage", "equal" if s["counts_equal"] and single["counts_equal"] else "DIFFERENT",
            "", "", "equal"),
    ]
    return Result({"preset": preset, "attention": backend, "summary": s}, rows,
                  [benchmark_regions.regions_report(preset, timing)])
