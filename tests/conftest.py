import pytest

import comfy_harness


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI started in-process on CPU with this pack loaded; skips the test when no checkout is found."""
    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    return comfy_harness.start()
