"""What a terminal shows after a program's output, for the tests of progress bars drawn with carriage returns."""

from __future__ import annotations


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: a carriage return goes back to the start of the line, and what is
    written then covers the old characters one by one, leaving those beyond it as they were."""
    lines, column = [""], 0
    for char in text:
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("")
            column = 0
        else:
            line = lines[-1]
            lines[-1] = line[:column] + char + line[column + 1:]
            column += 1
    return lines
