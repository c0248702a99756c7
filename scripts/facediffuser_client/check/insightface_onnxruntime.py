"""The first-run check of insightface and onnxruntime: the install command for this machine, conflicting onnxruntime
builds, and the execution providers that actually work (tried on a one-node ONNX model built by hand)."""

from __future__ import annotations

import sys

from .environment import installed_version
from .findings import INFO, MISSING, OK, PROBLEM, Finding

# Distributions that all install the same `onnxruntime` package and overwrite each other's files.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-qnn")


def onnxruntime_build(cuda_gpu: bool) -> str:
    """The onnxruntime distribution for this machine: the GPU build only where torch sees a CUDA GPU; elsewhere
    it runs on the CPU too, but prints provider errors (CUDA, TensorRT libraries not found) at every start."""
    return "onnxruntime-gpu" if cuda_gpu else "onnxruntime"


def insightface_install_command(cuda_gpu: bool, python: str = sys.executable) -> str:
    """insightface and the one onnxruntime build this machine wants. insightface's own requirements may pull the
    CPU build, so on a CUDA machine it is swapped for the GPU build afterwards rather than installed beside it."""
    pip = f"{python} -m pip"
    if cuda_gpu:
        return f"{pip} install insightface && {pip} uninstall -y onnxruntime && {pip} install onnxruntime-gpu"
    return f"{pip} install insightface onnxruntime"


def check_insightface(cuda_gpu: bool, python: str = sys.executable) -> Finding:
    version = installed_version("insightface")
    if version is None:
        return Finding(MISSING, "insightface", "not installed (a second step after requirements.txt, README 'Install')",
                       insightface_install_command(cuda_gpu, python))
    try:
        import insightface  # noqa: F401
    except Exception as error:
        return Finding(PROBLEM, "insightface", f"{version} installed but cannot be imported ({type(error).__name__}: {error})",
                       "reinstall it with the Python that runs ComfyUI; on Windows it needs the MSVC build tools or a prebuilt wheel")
    return Finding(OK, "insightface", version)


def onnxruntime_conflict(cuda_gpu: bool, python: str = sys.executable) -> Finding | None:
    installed = [(name, installed_version(name)) for name in ONNXRUNTIME_DISTRIBUTIONS]
    installed = [(name, version) for name, version in installed if version]
    if len(installed) < 2:
        return None
    names = [name for name, _ in installed]
    keep = onnxruntime_build(cuda_gpu)
    return Finding(
        PROBLEM, "onnxruntime",
        "several builds installed at once: " + ", ".join(f"{name} {version}" for name, version in installed)
        + "; they overwrite each other's files, so which one runs is an accident",
        f"{python} -m pip uninstall -y {' '.join(names)} && {python} -m pip install {keep}",
    )


def _protobuf_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _protobuf_field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _protobuf_varint(number << 3) + _protobuf_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _protobuf_varint(number << 3 | 2) + _protobuf_varint(len(data)) + data


def identity_onnx_model() -> bytes:
    """A one-node ONNX model (Identity on a float[1]) built by hand, so that providers can be tried without
    the `onnx` package or any model file. Field numbers from onnx.proto (IR version 7, opset 13)."""
    float_tensor = _protobuf_field(1, _protobuf_field(1, 1) + _protobuf_field(2, _protobuf_field(1, _protobuf_field(1, 1))))
    node = _protobuf_field(1, "x") + _protobuf_field(2, "y") + _protobuf_field(4, "Identity")
    graph = (_protobuf_field(1, node) + _protobuf_field(2, "provider_probe")
             + _protobuf_field(11, _protobuf_field(1, "x") + _protobuf_field(2, float_tensor))
             + _protobuf_field(12, _protobuf_field(1, "y") + _protobuf_field(2, float_tensor)))
    return _protobuf_field(1, 7) + _protobuf_field(7, graph) + _protobuf_field(8, _protobuf_field(1, "") + _protobuf_field(2, 13))


def working_providers(onnxruntime) -> dict[str, str]:
    """Each available provider -> "" when a session on it runs, else why not. onnxruntime quietly falls back
    to CPU when a provider's libraries (CUDA, cuDNN) do not load, so the session's own list decides."""
    import numpy  # onnxruntime depends on it

    model = identity_onnx_model()
    results = {}
    for provider in onnxruntime.get_available_providers():
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # the fallback warning is reported below, in words
        try:
            session = onnxruntime.InferenceSession(model, options, providers=[provider])
            if provider not in session.get_providers():
                results[provider] = f"falls back to {session.get_providers()[0]}"
                continue
            (output,) = session.run(None, {"x": numpy.array([1.5], dtype=numpy.float32)})
            results[provider] = "" if float(output[0]) == 1.5 else f"computed {output[0]} instead of 1.5"
        except Exception as error:
            results[provider] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return results


def check_onnxruntime(cuda_gpu: bool, python: str = sys.executable) -> list[Finding]:
    """Conflicting builds, then whether onnxruntime imports and which providers run; with a CUDA GPU, whether
    insightface can use it."""
    findings = [conflict] if (conflict := onnxruntime_conflict(cuda_gpu, python)) else []
    if not any(installed_version(name) for name in ONNXRUNTIME_DISTRIBUTIONS):
        return findings + [Finding(MISSING, "onnxruntime", "not installed (insightface's face detector runs on it)",
                                   f"{python} -m pip install {onnxruntime_build(cuda_gpu)}")]
    try:
        import onnxruntime
    except Exception as error:
        return findings + [Finding(PROBLEM, "onnxruntime", f"installed but cannot be imported ({type(error).__name__}: {error})",
                                   "uninstall every onnxruntime build and install one (docs/troubleshooting.md)")]
    providers = working_providers(onnxruntime)
    working = [name for name, problem in providers.items() if not problem]
    failing = [f"{name} ({problem})" for name, problem in providers.items() if problem]
    detail = f"{onnxruntime.__version__}, providers that work: {', '.join(working) or 'none'}"
    if failing:
        detail += f"; not working: {'; '.join(failing)}"
    if not working:
        return findings + [Finding(PROBLEM, "onnxruntime", detail, "reinstall onnxruntime (docs/troubleshooting.md)")]
    if cuda_gpu and "CUDAExecutionProvider" not in working:
        return findings + [Finding(
            INFO, "onnxruntime", detail,
            "face detection will run on the CPU (slower, same result). For the GPU: install onnxruntime-gpu built for "
            "your CUDA and cuDNN versions (docs/troubleshooting.md: CUDA provider not found)")]
    if not cuda_gpu and not conflict and installed_version("onnxruntime-gpu"):
        return findings + [Finding(
            INFO, "onnxruntime", detail + "; the GPU build, on a machine where torch sees no CUDA GPU",
            "it runs on the CPU but prints provider errors at every start; the CPU build is the one for this machine: "
            f"{python} -m pip uninstall -y onnxruntime-gpu && {python} -m pip install onnxruntime")]
    return findings + [Finding(OK, "onnxruntime", detail)]
