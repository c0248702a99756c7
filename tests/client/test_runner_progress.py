"""The runner's progress as a user reads it: each line says how long the job has run and about how long the node's
steps left take (the pace of its steps so far), piped or on a terminal, and the terminal's bar, redrawn in place,
never leaves the tail of a longer earlier bar on screen."""

from __future__ import annotations

import io

from facediffuser_client.progress import ProgressDisplay, StatusLine, clock_text
from terminal_screen import screen

WORKFLOW = {"11": {"class_type": "FaceDiffuserSNFSampler", "inputs": {}}, "12": {"class_type": "VAEDecode", "inputs": {}}}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def show_steps(stream, steps: list[tuple[float, tuple[int, int, str]]]) -> ProgressDisplay:
    """A job that begins running at time 0, then reports each (seconds after the previous one, progress)."""
    now = [0.0]
    display = ProgressDisplay(WORKFLOW, stream, clock=lambda: now[0])
    display.state("running")
    for seconds, progress in steps:
        now[0] += seconds
        display.step(progress)
    return display


def run_job(stream, seconds_per_step: float = 3.0) -> None:
    display = show_steps(stream, [(seconds_per_step, (step, 3, "11")) for step in range(1, 4)] + [(1.0, (1, 1, "12"))])
    display.state("finishing")
    display.close()


def test_a_shorter_bar_after_a_longer_one_leaves_nothing_of_it_on_screen():
    stream = Terminal()
    run_job(stream, seconds_per_step=4000.0)  # hours: the sampler's bar is the longer one
    shown = screen(stream.getvalue())
    assert shown[0] == "  running"
    assert shown[1].rstrip() == "  node 12 (VAEDecode) [" + "#" * 30 + "] 1/1, 3:20:01 elapsed"
    assert shown[2:] == ["  finishing", ""]


def test_piped_lines_say_the_time_elapsed_and_an_estimate_of_the_time_left():
    stream = io.StringIO()
    run_job(stream)
    assert stream.getvalue().splitlines() == [
        "  running",
        "  node 11 (FaceDiffuserSNFSampler): step 1/3, 0:03 elapsed",
        "  node 11 (FaceDiffuserSNFSampler): step 2/3, 0:06 elapsed, about 0:03 left",
        "  node 11 (FaceDiffuserSNFSampler): step 3/3, 0:09 elapsed",
        "  node 12 (VAEDecode): step 1/1, 0:10 elapsed",
        "  finishing",
    ]


def test_the_terminal_bar_carries_the_same_timing():
    stream = Terminal()
    show_steps(stream, [(30.0, (1, 50, "11")), (30.0, (2, 50, "11"))])
    assert screen(stream.getvalue())[-1].endswith("] 2/50, 1:00 elapsed, about 24:00 left")


def test_the_pace_restarts_with_each_node_and_a_restarted_sampler():
    """A second sampling (a new node, or the same node counting from 1 again) is timed from its own first step."""
    stream = io.StringIO()
    show_steps(stream, [(10.0, (step, 10, "11")) for step in (1, 2)] + [(1.0, (step, 10, "11")) for step in (1, 2, 3)])
    assert stream.getvalue().splitlines()[-1] == "  node 11 (FaceDiffuserSNFSampler): step 3/10, 0:23 elapsed, about 0:07 left"


def test_a_status_line_pads_over_what_it_covers_and_ends_with_a_newline():
    stream = Terminal()
    line = StatusLine(stream)
    line.draw("a long line of text")
    line.draw("short")
    line.end()
    line.end()  # nothing open: nothing written
    assert screen(stream.getvalue()) == ["short" + " " * 14, ""]


def test_clock_text():
    assert [clock_text(s) for s in (0, 7.9, 754, 3723)] == ["0:00", "0:07", "12:34", "1:02:03"]
