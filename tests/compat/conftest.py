"""Fixtures the compatibility tests share."""

import pytest


@pytest.fixture(scope="module")
def installed(comfyui, tmp_path_factory):
    """ComfyUI's folders moved to a tiny install (tests/support/tiny_install.py), with empty output and temp folders."""
    import folder_paths

    import tiny_install

    root = tmp_path_factory.mktemp("installed")
    models = tiny_install.install_models(root / "models")
    tiny_install.write_face_photos(root / "input")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "facediffuser", ([str(models / "facediffuser")], {".bin", ".safetensors"}))
        patch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(models / "insightface")], set()))
        patch.setattr(folder_paths, "models_dir", str(models))
        patch.setattr(folder_paths, "filename_list_cache", {})
        for kind in ("input", "output", "temp"):
            (root / kind).mkdir(exist_ok=True)
            patch.setattr(folder_paths, f"{kind}_directory", str(root / kind))
        yield root
