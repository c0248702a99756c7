"""Runs ComfyUI in this process, on CPU unless asked otherwise, with this pack loaded the way ComfyUI loads
custom nodes: the tests' ComfyUI tier and the benchmark.

The ComfyUI tier of the tests needs a ComfyUI checkout: set COMFYUI_PATH to it. Without one those tests
are skipped with a reason and the plain tier (facediffuser_core alone) still runs. Standard library only at
import: tests/comfy_startup/sitecustomize.py loads this file by its path into ComfyUI servers for the shims.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    return path if (path / "comfy" / "samplers.py").is_file() else None


SKIP_REASON = (
    "ComfyUI tier skipped: set COMFYUI_PATH to a ComfyUI checkout (0.17 or newer) whose requirements are installed "
    "(scripts/run_tests.sh does this when COMFYUI_PATH is set)"
)


def register_cpu_torchvision_ops() -> None:
    """The registry's only torchvision build is a CUDA one, whose `import` fails next to CPU torch because
    its C++ ops `torchvision::nms` and `qnms` are missing; ComfyUI imports torchvision at start-up.
    Defining them in pure torch before torchvision is imported lets it load (these tests never call them).
    A torchvision built for this torch (a GPU machine's) loads its own ops, and then nothing is defined."""
    import importlib.util

    import torch

    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    for library in Path(spec.submodule_search_locations[0]).glob("_C*.so") if spec else ():
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:  # built for another torch
            pass
    try:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        return  # a real torchvision build already defines them

    def _nms(dets, scores, iou_threshold):
        order = scores.argsort(descending=True)
        keep = []
        while order.numel():
            i = order[0]
            keep.append(int(i))
            if order.numel() == 1:
                break
            rest = order[1:]
            lt = torch.maximum(dets[i, :2], dets[rest, :2])
            rb = torch.minimum(dets[i, 2:], dets[rest, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=1)
            area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
            iou = inter / (area(dets[i]) + area(dets[rest]) - inter)
            order = rest[iou <= iou_threshold]
        return torch.tensor(keep, dtype=torch.int64)

    for op in ("nms", "qnms"):
        torch.library.impl(f"torchvision::{op}", "default", _nms)


def stand_in_for_missing_torchaudio() -> None:
    """ComfyUI from 0.33 imports torchaudio at start-up (comfy/sd.py -> the LTX audio VAE), and no torchaudio
    build exists for the CPU torch the tests use. A stand-in module lets ComfyUI import; only its audio nodes,
    which these tests never run, would call it, and then they fail saying why."""
    stand_in_if_missing("torchaudio")


def stand_in_if_missing(package: str) -> bool:
    """Stand-in modules for `package` and any of its submodules when it is not installed: every attribute is a
    callable that fails naming what is missing. For packages ComfyUI imports at start-up for features the tests
    and dev tools never use (torchaudio for audio nodes; av for video types, which comfy_api.latest imports).
    True when the stand-in was installed."""
    import importlib.util

    if package in sys.modules or importlib.util.find_spec(package) is not None:
        return False
    sys.meta_path.append(_StandInFinder(package))
    return True


class _Unavailable:
    """What a stand-in module's attributes are: calling one fails, saying which package is missing; it can be
    used where modules are merely named at import (annotations, `X | None`, default arguments)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        package = self.name.split(".")[0]
        raise RuntimeError(f"{self.name}: {package} is not installed here (a stand-in is loaded, for ComfyUI's imports only)")

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):  # copy, pickle and typing probe dunders: they must see a plain object
            raise AttributeError(attribute)
        return _Unavailable(f"{self.name}.{attribute}")

    def __or__(self, other):
        return self

    __ror__ = __or__


class _StandInFinder:
    """Imports `package` and its submodules as stand-in modules (sys.meta_path finder and loader)."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, name: str, path=None, target=None):
        import importlib.machinery

        if name == self.package or name.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attribute: getattr(_Unavailable(spec.name), attribute)
        return module

    def exec_module(self, module) -> None:
        pass


class ComfyUI:
    """ComfyUI's modules after start-up, and this pack's node classes by node id."""

    def __init__(self, root: Path, cpu: bool = True, arguments: Sequence[str] = ()):
        self.root = root
        register_cpu_torchvision_ops()
        stand_in_for_missing_torchaudio()
        self.stand_ins = [package for package in ("av",) if stand_in_if_missing(package)]
        sys.path.insert(0, str(root))
        sys.argv = [sys.argv[0], *arguments]  # ComfyUI parses the command line on import
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        comfy.cli_args.args.cpu = cpu
        comfy.cli_args.args.disable_api_nodes = True
        self.dynamic_vram = _start_dynamic_vram() if not cpu else "off: ComfyUI runs on the CPU"
        import utils.extra_config  # noqa: F401  (before `nodes`, which shadows the root `utils`)
        import folder_paths
        import nodes

        # Previews and outputs of the tests go to a scratch folder, not into the checkout.
        scratch = Path(tempfile.mkdtemp(prefix="facediffuser-comfyui-"))
        folder_paths.set_temp_directory(str(scratch / "temp"))
        folder_paths.set_output_directory(str(scratch / "output"))

        self.nodes = nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        loaded = asyncio.run(nodes.load_custom_node(str(REPO_ROOT)))
        if not loaded:
            raise RuntimeError("ComfyUI could not load the Face-diffuser pack; its log above says why")
        self.pack_module = sys.modules[str(REPO_ROOT).replace(".", "_x_")]

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def run(self, node_id: str, **inputs):
        """Execute one node as ComfyUI's executor does for V1 and V3 nodes and return its outputs tuple."""
        cls = self.node(node_id)
        if hasattr(cls, "PREPARE_CLASS_CLONE"):
            output = cls.PREPARE_CLASS_CLONE({}).execute(**inputs)
            return output.result
        return getattr(cls(), cls.FUNCTION)(**inputs)

    def pack(self, dotted: str):
        """A submodule of this pack as ComfyUI imported it, e.g. pack('nodes.snf_guider')."""
        import importlib

        return importlib.import_module(f"{self.pack_module.__name__}.{dotted}")


_instance: ComfyUI | None = None


def start(cpu: bool = True, arguments: Sequence[str] = ()) -> ComfyUI:
    """The process's one ComfyUI, started at the first call, on CPU unless `cpu` is False: then ComfyUI picks its
    device itself (the GPU, for the benchmark's --device cuda) and, on NVIDIA, its model patcher as main.py does
    (dynamic VRAM by default). `arguments` are main.py's command-line arguments (e.g. an attention backend's)."""
    global _instance
    if _instance is None:
        root = comfyui_path()
        if root is None:
            raise RuntimeError(SKIP_REASON)
        _instance = ComfyUI(root, cpu, arguments)
    return _instance


def _start_dynamic_vram() -> str:
    """main.py's start of ComfyUI's dynamic VRAM (comfy-aimdo; the default patcher on NVIDIA since 0.17),
    which importing ComfyUI's modules does not do: before CUDA starts, the library; then its devices, and
    ModelPatcherDynamic as the patcher every loader builds. Both protocols: 0.17's init()/init_device(index),
    0.33's init(headroom, ...)/init_devices(indices). Says what it did."""
    import comfy.cli_args
    import comfy_aimdo.control

    args = comfy.cli_args.args
    if not comfy.cli_args.enables_dynamic_vram():
        return "off: ComfyUI's arguments disable it"
    control = comfy_aimdo.control
    reserve = getattr(args, "reserve_vram", None)
    headroom = None if reserve is None else int(reserve * 1024 ** 3)
    loaded = False
    for protocol in ({"simple_vram_headroom": headroom, "nvml_pressure": not getattr(args, "disable_nvml_pressure", False)},
                     {"simple_vram_headroom": headroom}, {}):
        try:
            loaded = control.init(**protocol)
            break
        except TypeError:
            continue
    if not loaded:
        return "off: comfy-aimdo did not load"
    import comfy.memory_management
    import comfy.model_management as management
    import comfy.model_patcher

    if not management.is_nvidia() and not args.enable_dynamic_vram:
        return "off: not an NVIDIA GPU"
    if management.torch_version_numeric < (2, 8) and not args.enable_dynamic_vram:
        return "off: torch older than 2.8"
    devices = [device.index for device in getattr(management, "get_all_torch_devices", lambda: [management.get_torch_device()])()]
    if hasattr(control, "init_devices"):
        headroom = int(getattr(args, "vram_headroom", 0) * 1024 ** 3)
        try:
            started = control.init_devices([(index, headroom) for index in devices])
        except TypeError:  # comfy-aimdo before 0.4.10 takes the indices alone
            started = control.init_devices(devices)
    else:
        started = control.init_device(devices[0])
    if not started:
        return "off: comfy-aimdo found no device it can manage"
    control.set_log_warning()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return f"on: {comfy.model_patcher.ModelPatcherDynamic.__name__}"
