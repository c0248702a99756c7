"""The machine the kit is prepared for, and what it must carry there.

A lent GPU machine runs a fixed image: Python 3.12 on x86-64 Linux, torch 2.11 with CUDA 13, and the packages
below; it reaches no network, and 64 MiB travel with the working tree. ComfyUI needs a few packages the image
lacks; the kit carries them as wheels (CARRIED), and leaves behind what its in-process ComfyUI never imports
(NOT_CARRIED, with the reason). Standard library only: prepare.py runs before any environment exists."""

from __future__ import annotations

import re
from dataclasses import dataclass

PYTHON_VERSION = "3.12"
IMPLEMENTATION = "cp"
# pip matches manylinux tags exactly: every glibc level a wheel of these packages is built for, up to the image's.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
CARRY_LIMIT_BYTES = 64 * 1024 ** 2  # the working tree and every carried path together

# The image's Python packages (pip names), as listed for the lent machines in November 2026.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())


@dataclass(frozen=True)
class Carried:
    name: str
    why: str
    # Where its version comes from: the ComfyUI checkout's requirements.txt, the tests' requirements, or pinned here.
    pinned_from: str
    pin: str = ""
    # Compiled code the kit never runs, left out of the wheel (the rest of the package imports without it).
    leave_out: tuple[str, ...] = ()


CARRIED = (
    Carried("comfy-aimdo", "dynamic VRAM, ComfyUI's default model patcher on NVIDIA; comfy/model_patcher.py imports it",
            "comfyui"),
    Carried("comfy-kitchen", "comfy/ldm/modules/attention.py imports it (0.33). Its compiled CUDA and ROCm kernels (56 MiB) "
            "serve fp8/fp4 weights and int8 attention, which an SD1.5 run in fp16 never calls, and are left out",
            "comfyui", leave_out=("comfy_kitchen/backends/cuda/_C.abi3.so", "comfy_kitchen/backends/hip/_C.abi3.so")),
    Carried("torchsde", "comfy/k_diffusion/sampling.py imports it", "comfyui"),
    Carried("trampoline", "torchsde's dependency", "here", pin="0.1.2"),
    Carried("diffusers", "the dev kit builds the dynamic-VRAM measurement's tiny official checkpoints with it", "tests"),
    Carried("importlib-metadata", "diffusers' dependency", "here", pin="8.7.0"),
)

NOT_CARRIED = {
    "av": "35 MiB of FFmpeg; comfy_api imports it for video types, which the kit never uses: the dev kit stands it in",
    "comfyui-frontend-package, comfyui-workflow-templates, comfyui-embedded-docs": "the server's web page; the kit runs ComfyUI in-process",
    "SQLAlchemy, alembic, blake3": "the server's database and asset hashes",
    "kornia, spandrel, simpleeval, pydantic, pydantic-settings, PyOpenGL, glfw, comfy-angle":
        "optional: only comfy_extras nodes the kit never runs import them (ComfyUI logs them as not imported)",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return canonical(match.group(1)) if match else ""


def wheel_tags(filename: str) -> tuple[str, str, str, str, str]:
    """(distribution, version, python tags, abi tag, platform tags) of a wheel's file name (PEP 427)."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) == 6:  # a build tag
        del parts[2]
    if len(parts) != 5:
        raise ValueError(f"{filename} is not a wheel's file name")
    return parts[0], parts[1], parts[2], parts[3], parts[4]


def runs_on_the_image(filename: str) -> bool:
    """Whether a wheel installs on the image's Python (CPython 3.12, x86-64 manylinux)."""
    _, _, pythons, abi, platforms = wheel_tags(filename)
    python_ok = any(tag in ("py3", "cp312") or (tag.startswith("cp3") and abi == "abi3" and int(tag[3:]) <= 12)
                    for tag in pythons.split("."))
    abi_ok = abi in ("none", "abi3", "cp312")
    platform_ok = any(tag == "any" or tag in PLATFORMS for tag in platforms.split("."))
    return python_ok and abi_ok and platform_ok


def applies_on_the_image(marker: str) -> bool:
    """Whether a requirement's environment marker holds on the image; markers the kit's wheels use are about
    extras and Python versions (anything else is taken to hold, so that a missing dependency is reported)."""
    if "extra ==" in marker:
        return False
    for operator, version in re.findall(r'python_version\s*(<=|>=|==|!=|<|>)\s*["\']([^"\']+)["\']', marker):
        image, wanted = tuple(map(int, PYTHON_VERSION.split("."))), tuple(map(int, version.split(".")))
        if not {"<": image < wanted, "<=": image <= wanted, ">": image > wanted, ">=": image >= wanted,
                "==": image == wanted, "!=": image != wanted}[operator]:
            return False
    return True
