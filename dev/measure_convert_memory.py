"""Peak memory of `python -m facediffuser_core.convert` on a fake TDM of a few hundred MB.

    PYTHONPATH=scripts .venv/bin/python -m dev.measure_convert_memory [--megabytes 300]

The fake is the tests' tiny TDM with every tensor enlarged to an equal share of the requested size
(the converter only renames and casts, so shapes do not matter to it; the real files' largest tensor,
the token embedding, is likewise about 4% of the whole), saved with torch.save as the official files are. Each conversion runs in a fresh process, which reports its
resident set before converting (after imports) and its peak (VmHWM) after; peak RSS counts the
input's memory-mapped pages that were read, which the kernel can drop at any time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from facediffuser_client.pack import PACK_ROOT

CHILD = """
import sys, logging
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
import torch
from facediffuser_core import convert
before = status("VmRSS")
convert.convert(sys.argv[1], sys.argv[2], convert.DTYPES[sys.argv[3]], overwrite=True)
print(f"{before:.0f} {status('VmHWM'):.0f} {status('RssAnon'):.0f} {status('RssFile'):.0f}")
"""


def make_fake(path: Path, megabytes: int) -> None:
    import torch

    from dev.devkit import official_checkpoints

    state = official_checkpoints.official_state_dict(official_checkpoints.build_tdm(), with_position_ids=False)
    share = megabytes * 2**20 // (4 * len(state))
    torch.save({key: torch.randn(share) for key in state}, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "fake_tdm.bin"
        make_fake(source, args.megabytes)
        size = source.stat().st_size / 2**20
        print(f"input: {size:.0f} MiB (torch.save zip format)")
        for dtype in ("fp32", "fp16"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(source), str(Path(folder) / f"out_{dtype}.safetensors"), dtype],
                cwd=PACK_ROOT, capture_output=True, text=True, check=True,
            )
            before, peak, anonymous, mapped = map(float, done.stdout.split())
            print(
                f"{dtype}: RSS before {before:.0f} MiB, peak {peak:.0f} MiB (+{peak - before:.0f} MiB = "
                f"{(peak - before) / size:.2f} x input); at the end {anonymous:.0f} MiB anonymous, {mapped:.0f} MiB file-backed"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
