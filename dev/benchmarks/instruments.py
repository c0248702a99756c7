"""The benchmark's instruments: every UNet call counted and timed, ComfyUI's model loads and weight moves
counted, the host reads of tensor values counted per place in the code, CUDA host syncs counted. Other
measurements import them from here (the one place they live)."""

from __future__ import annotations

import collections
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class UNetCall:
    model: str
    rows: int
    sigma: torch.Tensor  # the evaluation's noise levels, read only after the run
    start: float | torch.cuda.Event
    host_start: float  # perf_counter around the call: on CUDA the host's share (launches), on CPU the call itself
    end: float | torch.cuda.Event | None = None
    host_end: float | None = None


@dataclass
class Evaluation:
    """One call of the guider by the sampler: when it began and at which noise level (read after the run)."""

    start: float
    sigma: torch.Tensor


class UNetMeter:
    """Counts and times every UNet call of the watched models.

    On CUDA each call is bracketed by two events and nothing is read until the run has finished, so the
    meter itself adds no host sync to the sampling it measures.
    """

    def __init__(self, models: dict[str, object], device: str):
        self.models = models  # name -> ComfyUI BaseModel
        self.device = device
        self.calls: list[UNetCall] = []
        self.predict_noise_at: float | None = None
        self.preludes: list[float] = []  # host seconds from a guider's predict_noise to its first UNet call
        self.evaluations: list[Evaluation] = []
        self.snf_s: collections.defaultdict[int, float] = collections.defaultdict(float)  # evaluation -> seconds of SNF maths

    @contextmanager
    def watching(self):
        for name, model in self.models.items():
            model.diffusion_model.forward = self._timed(name, model.diffusion_model.forward)
        try:
            yield self
        finally:
            for model in self.models.values():
                del model.diffusion_model.forward  # the instance attribute; the class's forward shows again

    def _clock(self):
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark_predict_noise(self, sigma: torch.Tensor) -> None:
        self.predict_noise_at = time.perf_counter()
        self.evaluations.append(Evaluation(self.predict_noise_at, sigma))

    def _timed(self, name: str, forward):
        def timed(x, *args, **kwargs):
            if self.predict_noise_at is not None:
                self.preludes.append(time.perf_counter() - self.predict_noise_at)
                self.predict_noise_at = None
            sigma = kwargs["transformer_options"]["sigmas"]
            call = UNetCall(name, x.shape[0], sigma, self._clock(), time.perf_counter())
            self.calls.append(call)
            out = forward(x, *args, **kwargs)
            call.host_end = time.perf_counter()
            call.end = self._clock()
            return out

        return timed

    def take(self) -> list[UNetCall]:
        calls, self.calls = self.calls, []
        return calls

    def take_preludes(self) -> list[float]:
        preludes, self.preludes = self.preludes, []
        return preludes

    def take_evaluations(self) -> list[Evaluation]:
        evaluations, self.evaluations = self.evaluations, []
        return evaluations

    def call_seconds(self, call: UNetCall) -> float:
        return call.start.elapsed_time(call.end) / 1000.0 if self.device == "cuda" else call.end - call.start

    def seconds(self, calls: list[UNetCall]) -> float:
        return sum(self.call_seconds(c) for c in calls)


@dataclass
class LoadEvent:
    kind: str  # "load_models_gpu", "load", "partial_unload", "offload"
    models: list[str]
    during_sampling: bool  # after the run's first UNet call


class LoadSpy:
    """Counts ComfyUI's model loads and weight moves per model while active.

    load_models_gpu is the request; the patcher's `load` is what actually patches weights and moves them to
    the load device (it is skipped when the model is already fully loaded), `partially_unload` and an
    unpatch to the offload device are the moves back.
    """

    def __init__(self, names: dict[int, str], meter: UNetMeter):
        self.names = names  # id(BaseModel) -> model name; clones share the BaseModel
        self.meter = meter
        self.events: list[LoadEvent] = []

    def _record(self, kind: str, patchers) -> None:
        models = [self.names.get(id(p.model), "other") for p in patchers]
        self.events.append(LoadEvent(kind, models, during_sampling=bool(self.meter.calls)))

    @contextmanager
    def watching(self, *patcher_classes):
        """Spies on the loads of these patcher classes (and of their bases that define the methods: a subclass's
        override and the base's method it calls are one event, the outermost call's)."""
        import comfy.model_management

        spy = self
        real_load_models_gpu = comfy.model_management.load_models_gpu
        depth = [0]

        def load_models_gpu(models, *args, **kwargs):
            spy._record("load_models_gpu", models)
            return real_load_models_gpu(models, *args, **kwargs)

        def spied(real, kind):
            def method(patcher, *args, **kwargs):
                if depth[0] == 0 and kind(patcher, *args, **kwargs):
                    spy._record(kind.__name__, [patcher])
                depth[0] += 1
                try:
                    return real(patcher, *args, **kwargs)
                finally:
                    depth[0] -= 1

            return method

        def load(patcher, *args, **kwargs):
            return True

        def partial_unload(patcher, *args, **kwargs):
            return True

        def offload(patcher, device_to=None, unpatch_weights=True):  # an unpatch that moves the weights back
            return device_to is not None and unpatch_weights

        kinds = {"load": load, "partially_unload": partial_unload, "unpatch_model": offload}
        owners = {(owner, name) for cls in patcher_classes for owner in cls.__mro__ for name in kinds if name in vars(owner)}
        originals = {(owner, name): vars(owner)[name] for owner, name in owners}
        comfy.model_management.load_models_gpu = load_models_gpu
        for (owner, name), real in originals.items():
            setattr(owner, name, spied(real, kinds[name]))
        try:
            yield self
        finally:
            comfy.model_management.load_models_gpu = real_load_models_gpu
            for (owner, name), real in originals.items():
                setattr(owner, name, real)

    def take(self) -> list[LoadEvent]:
        events, self.events = self.events, []
        return events


# Python's ways of reading a tensor's values on the host; on a GPU each read of a device tensor waits for the
# device's queue to drain (a host sync).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


class HostReadCounter:
    """Counts the host reads of tensor values per place in the code, and whether sampling had begun (a
    guider was called). On the CPU nothing is on a device, so every read is counted: a read of the sigma
    schedule the code keeps on the host shows here too, under its own place."""

    def __init__(self, meter: UNetMeter):
        self.meter = meter
        self.reads: dict[tuple[str, str], int] = {}  # (phase, place) -> reads

    @contextmanager
    def counting(self):
        originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def counted(original):
            def read(tensor, *args, **kwargs):
                code = sys._getframe(1).f_code
                key = ("sampling" if self.meter.evaluations else "set-up", f"{Path(code.co_filename).name}:{code.co_name}")
                self.reads[key] = self.reads.get(key, 0) + 1
                return original(tensor, *args, **kwargs)

            return read

        self.reads = {}
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def total(self, phase: str) -> int:
        return sum(count for (read_phase, _), count in self.reads.items() if read_phase == phase)



def count_host_syncs(run) -> int:
    """Synchronising CUDA operations during `run`, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)

