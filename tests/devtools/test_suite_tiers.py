"""The suite's tiers and layout (docs/testing.md): collected with -m "not comfyui", as the fast command deselects, no
test that loads ComfyUI into the process is selected; every test that starts ComfyUI servers carries `server`; every
test module sits in a feature folder, and no module imports a test module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import tiers

TESTS = tiers.TESTS


@pytest.mark.slow  # 10.7 s here
def test_markers_follow_what_each_test_uses_and_every_module_sits_in_a_feature_folder(tmp_path):
    report = tmp_path / "tiers.json"
    env = {**os.environ, "FACEDIFFUSER_TIER_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS / "support"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "tier_report",
                           "-m", "not comfyui"], cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    tests = json.loads(report.read_text())
    assert len(tests) > 700 and any(not test["selected"] for test in tests)
    for test in tests:
        assert ("comfyui" in test["fixtures"]) == ("comfyui" in test["markers"]), test["id"]
        assert test["selected"] == ("comfyui" not in test["markers"]), test["id"]
        if set(test["fixtures"]) & tiers.SERVER_FIXTURES:
            assert "server" in test["markers"], test["id"]
        assert test["path"].split("/")[0] in tiers.FEATURES, f"{test['path']}: in no feature folder"


def test_no_test_module_imports_another():
    importing = re.compile(r"^\s*(?:from|import) test_\w+", re.MULTILINE)
    offenders = [path.relative_to(TESTS).as_posix() for path in TESTS.rglob("*.py") if importing.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
