"""A finding of the first-run check: what it looked at, in what state, and the fix when it needs the user's action."""

from __future__ import annotations

from dataclasses import dataclass

OK, MISSING, PROBLEM, INFO = "ok", "missing", "problem", "info"


@dataclass
class Finding:
    status: str
    subject: str
    detail: str
    fix: str = ""


def to_do(findings: list[Finding]) -> list[Finding]:
    """The findings that need the user's action; the check and the set-up end with status 1 while there are any."""
    return [f for f in findings if f.status in (MISSING, PROBLEM)]
