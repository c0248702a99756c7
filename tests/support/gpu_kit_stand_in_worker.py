"""A stand-in for the GPU kit's worker (dev/gpu_kit/worker.py) that speaks its protocol without ComfyUI; what it
does with each measurement depends on the name's start: ok- gives a result, fail- a recorded failure, hang-
never ends, die- ends the process."""

import json
import sys
import time

from dev.gpu_kit.worker import MARK, parse_args, write_whole


def main() -> int:
    args = parse_args()
    print(MARK + "started " + json.dumps({"device": "stand-in worker"}), flush=True)
    for name in args.measurements.split(","):
        print(MARK + "begin " + name, flush=True)
        if name.startswith("hang-"):
            time.sleep(3600)
        if name.startswith("die-"):
            print(f"{name}: planted death", file=sys.stderr, flush=True)
            return 3
        failed = name.startswith("fail-")
        write_whole(args.results / f"{name}.json", {
            "name": name, "status": "failed" if failed else "ok", "labels": {"device": "stand-in worker"}, "seconds": 0.0,
            "rows": [{"measure": f"{name} measure", "value": "1 s", "reference": "1 s", "ratio": "1.000", "goal": "1"}], "tables": [],
            **({"error": "Traceback ...\nRuntimeError: planted failure"} if failed else {})})
        print(MARK + "end " + name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
