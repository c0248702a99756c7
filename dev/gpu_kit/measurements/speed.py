"""Seconds per picture of the official split against KSampler and the 1.30x evaluation floor, peak memory, host
syncs and host reads per run: the benchmark's default mode (dev.benchmarks: overhead, memory) on this device,
SD1.5-size UNets, on a GPU at 512x512, 50 steps, fp16."""

from __future__ import annotations

from dev.benchmarks import cli, memory, overhead, report

from . import Context, Result, Row

TINY = ("--tiny",)
GIB = 1024 ** 3


def measure(context: Context) -> Result:
    args, preset = cli.parse_arguments(context.benchmark_arguments(tiny=TINY))
    context.log("memory probes (a fresh process each)")
    probes = memory.run_memory_probes(args)
    timing = overhead.timing_benchmark(context.comfyui, preset, context.device, context.log)
    s = timing["summary"]
    size = f"{preset.latent_side * 8}x{preset.latent_side * 8}, {preset.steps} steps, {preset.dtype}"
    floor = s["evaluation_ratio"] * s["ksampler_wall_s"]
    rows = [
        Row(f"seconds per picture, official split ({size})", f"{s['snf_official_wall_s']:.3f} s", f"{s['ksampler_wall_s']:.3f} s",
            f"{s['snf_official_wall_s'] / s['ksampler_wall_s']:.3f}", f"{s['evaluation_ratio']:.2f} (the evaluations)"),
        Row("official split against the floor (KSampler's time x the evaluation ratio)", f"{s['snf_official_wall_s']:.3f} s",
            f"{floor:.3f} s", f"{s['official_wall_over_floor']:.3f}", "<= 1.03"),
        Row("alpha = beta = 0 (KSampler's evaluations) against KSampler", f"{s['snf_plain_wall_s']:.3f} s", f"{s['ksampler_wall_s']:.3f} s",
            f"{s['plain_wall_ratio']:.3f}", "<= 1.02"),
    ]
    if context.device == "cuda":
        vram = {name: probes[name]["vram_peak"] for name in ("snf", "ksampler")}
        in_use = {name: probes[name]["vram_in_use_after"] for name in ("snf", "ksampler")}
        syncs = timing["host_syncs"]
        rows += [
            Row("peak VRAM (torch.cuda.max_memory_allocated, a fresh process each)", f"{vram['snf'] / GIB:.2f} GiB",
                f"{vram['ksampler'] / GIB:.2f} GiB", f"{vram['snf'] / vram['ksampler']:.2f}", "the TDM's weights more"),
            Row("device memory in use after sampling (every allocator: dynamic VRAM's too)", f"{in_use['snf'] / GIB:.2f} GiB",
                f"{in_use['ksampler'] / GIB:.2f} GiB", f"{in_use['snf'] / in_use['ksampler']:.2f}", ""),
            Row("host syncs per run (torch.cuda sync debug mode), official split", str(syncs["snf_official"]), str(syncs["ksampler"]),
                "", "no more than KSampler's"),
        ]
    else:
        rss = {name: probes[name]["rss_peak"] for name in ("snf", "ksampler")}
        rows.append(Row("peak resident memory (a fresh process each)", f"{rss['snf'] / GIB:.2f} GiB", f"{rss['ksampler'] / GIB:.2f} GiB",
                        f"{rss['snf'] / rss['ksampler']:.2f}", ""))
    reads = timing["host_reads"]
    rows.append(Row("host reads of tensor values per run while sampling, official split", str(reads["snf_official"]["sampling"]),
                    str(reads["ksampler"]["sampling"]), "", "1 more than KSampler (the count's check)"))
    tables = [report.header(args, preset, timing), report.report(args, preset, timing, probes)]
    figures = {"preset": preset, "summary": s, "host_reads": reads, "host_syncs": timing.get("host_syncs"), "memory": probes,
               "snf_maths_s": timing["snf_maths_s"], "runs": timing["runs"]}
    return Result(figures, rows, tables)
