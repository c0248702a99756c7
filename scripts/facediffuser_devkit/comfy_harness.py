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
    Defining them in pure torch before torchvision is imported lets it load (these tests never call them)."""
    import torch

    if "torchvision" in sys.modules:
        return
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
    import importlib.machinery
    import importlib.util
    import types

    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return

    class _Unavailable:
        def __init__(self, name: str):
            self.name = name

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.name}: torchaudio is not installed in the test environment (a stand-in is loaded)")

        def __getattr__(self, attribute: str):
            return _attribute(self.name, attribute)

    def _attribute(owner: str, attribute: str):
        if attribute.startswith("__"):  # module machinery (__file__, __path__, ...) must see a plain module
            raise AttributeError(attribute)
        return _Unavailable(f"{owner}.{attribute}")

    def stand_in(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        module.__getattr__ = lambda attribute: _attribute(name, attribute)
        sys.modules[name] = module
        return module

    root = stand_in("torchaudio")
    for submodule in ("functional", "transforms"):
        setattr(root, submodule, stand_in(f"torchaudio.{submodule}"))


class ComfyUI:
    """ComfyUI's modules after start-up, and this pack's node classes by node id."""

    def __init__(self, root: Path, cpu: bool = True):
        self.root = root
        register_cpu_torchvision_ops()
        stand_in_for_missing_torchaudio()
        sys.path.insert(0, str(root))
        sys.argv = [sys.argv[0]]  # ComfyUI parses the command line on import
        import comfy.cli_args

        comfy.cli_args.args.cpu = cpu
        comfy.cli_args.args.disable_api_nodes = True
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


def start(cpu: bool = True) -> ComfyUI:
    """The process's one ComfyUI, started at the first call, on CPU unless `cpu` is False: then ComfyUI picks its
    device itself (the GPU, for the benchmark's --device cuda)."""
    global _instance
    if _instance is None:
        root = comfyui_path()
        if root is None:
            raise RuntimeError(SKIP_REASON)
        _instance = ComfyUI(root, cpu)
    return _instance
