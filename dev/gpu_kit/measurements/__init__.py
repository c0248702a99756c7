"""The GPU kit's measurements, one module each; each has `measure(context) -> Result` and a docstring whose
first line says what it measures. Figures go to the JSON file, rows to the Markdown summary, the benchmark's
own tables (where a measurement is one of its modes) below it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Context:
    comfyui: object  # dev.devkit.comfy_harness.ComfyUI
    device: str      # "cuda" or "cpu"
    tiny: bool       # the CPU rehearsal's sizes
    scratch: Path    # a folder of this measurement's own
    log: Callable[[str], None]

    def benchmark_arguments(self, *mode: str, tiny: tuple[str, ...] = ()) -> list[str]:
        """The benchmark's command-line arguments for one of its modes on this device, at the rehearsal's
        sizes when tiny (the sizes of everything else: the benchmark's own defaults for the device)."""
        return [*mode, "--device", self.device, *(tiny if self.tiny else ())]


@dataclass(frozen=True)
class Row:
    """A line of the summary table: what Face-diffuser does, against what, their ratio and the goal."""

    measure: str
    value: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""


@dataclass
class Result:
    figures: dict
    rows: list[Row]
    tables: list[str] = field(default_factory=list)  # Markdown tables shown whole below the summary

    def as_json(self) -> dict:
        return {"figures": self.figures, "rows": [dataclasses.asdict(row) for row in self.rows], "tables": self.tables}


def relative_difference(value, reference) -> float:
    """||value - reference|| / ||reference|| over all elements, in float64."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())
