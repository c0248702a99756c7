import pytest

from dev.devkit import comfy_harness


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI started in-process on CPU with this pack loaded; skips the test when no checkout is found."""
    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    return comfy_harness.start()


@pytest.fixture(scope="session")
def tdm():
    """Reference modules of a tiny TDM in the official layout (dev.devkit.official_checkpoints)."""
    from dev.devkit import official_checkpoints

    return official_checkpoints.build_tdm(seed=0)


@pytest.fixture(scope="session")
def sdm():
    """Reference modules of a tiny SDM in the official layout. Test modules that need a loaded SDM
    instead define their own `sdm` fixture, which takes precedence there."""
    from dev.devkit import official_checkpoints

    return official_checkpoints.build_sdm(seed=1)


@pytest.fixture(scope="module")
def models(comfyui):
    """A tiny random TDM and SDM (dev.devkit.tiny_comfy): (tdm, sdm), fresh for each test module."""
    from dev.devkit import tiny_comfy

    return tiny_comfy.model_pair()


@pytest.fixture(scope="module")
def conds(comfyui):
    """Random augmented, text and null conditionings for the tiny models, by input name."""
    from dev.devkit import tiny_comfy

    return tiny_comfy.three_conditionings()
