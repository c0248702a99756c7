"""Fixtures the tests of the client's command lines share."""

import pytest

from dev.devkit import comfy_harness
import comfy_server
from facediffuser_client import own_comfyui


@pytest.fixture
def nothing_at_the_default_address(monkeypatch):
    monkeypatch.setattr(own_comfyui, "DEFAULT_SERVER", f"http://127.0.0.1:{comfy_server.free_port()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    with comfy_server.running_server(tmp_path_factory.mktemp("comfyui")) as running:
        yield running
