"""The suite's tiers (markers registered in pytest.ini, described in docs/testing.md) and its feature folders:
conftest.py marks each collected test from what it uses, devtools/test_suite_tiers.py holds the suite to it."""

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
FEATURES = {"core", "sampling", "regions", "pack_nodes", "client", "batch", "docs", "compat", "devtools"}
# Fixtures that start ComfyUI servers on loopback (or a browser against one).
SERVER_FIXTURES = {"server", "two_servers", "canvas"}
# Modules each of whose tests starts processes that start ComfyUI: Ray clusters, the quick start's runner, the GPU kit's
# rehearsal. A test elsewhere that starts one in its own body carries @pytest.mark.server.
SERVER_MODULES = {"batch/test_batch_ray_comfyui.py", "batch/test_batch_ray_faults.py", "client/test_first_picture.py",
                  "devtools/test_gpu_kit_comfyui.py", "pack_nodes/test_canvas_browser_comfyui.py"}


def mark(item) -> None:
    """`comfyui` on a test that uses the in-process ComfyUI fixture, `server` on one that starts ComfyUI servers."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if "comfyui" in fixtures:
        item.add_marker(pytest.mark.comfyui)
    if fixtures & SERVER_FIXTURES or item.path.relative_to(TESTS).as_posix() in SERVER_MODULES:
        item.add_marker(pytest.mark.server)
