"""A pytest plugin for devtools/test_suite_tiers.py: writes to the file FACEDIFFUSER_TIER_REPORT names, as JSON, each
collected test's path, fixtures and markers, and whether the run's -m selected it."""

import json
import os

_deselected = []


def pytest_deselected(items):
    _deselected.extend(items)


def pytest_collection_finish(session):
    def entry(item, selected):
        return {"id": item.nodeid, "path": item.path.relative_to(session.config.rootpath).as_posix(), "selected": selected,
                "fixtures": sorted(getattr(item, "fixturenames", ())), "markers": sorted({mark.name for mark in item.iter_markers()})}

    report = [entry(item, True) for item in session.items] + [entry(item, False) for item in _deselected]
    with open(os.environ["FACEDIFFUSER_TIER_REPORT"], "w", encoding="utf-8") as file:
        json.dump(report, file)
