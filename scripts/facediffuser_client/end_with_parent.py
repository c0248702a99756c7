"""`python end_with_parent.py PARENT_PID SCRIPT ARGS...`: become `python SCRIPT ARGS...`, killed by the kernel when
the process PARENT_PID (the one that started this) dies, however it dies. OwnComfyUI starts a Ray worker's ComfyUI
through it: the request to the kernel is made here, after exec, where the subprocess documentation warns against
running Python in the forked child of a multithreaded process (preexec_fn). Linux only (prctl)."""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, script, *arguments = sys.argv[1:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        sys.exit(f"end_with_parent: prctl failed (errno {ctypes.get_errno()})")
    if os.getppid() != int(parent):
        sys.exit("end_with_parent: the process that started this has already exited")
    # exec keeps the death signal: ComfyUI itself is killed with its parent.
    os.execv(sys.executable, [sys.executable, script, *arguments])


if __name__ == "__main__":
    main()
