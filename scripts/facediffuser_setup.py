#!/usr/bin/env python3
"""Set-up: download Face-diffuser's model files and put them where ComfyUI and the pack look for them.

    python scripts/facediffuser_setup.py              # from ComfyUI/custom_nodes/<this pack>
    python scripts/facediffuser_setup.py --convert    # also convert both models to fp16 safetensors
    python scripts/facediffuser_setup.py --dry-run    # say what it would do, change nothing

Run it with the Python that runs ComfyUI: huggingface_hub comes with ComfyUI's requirements. It downloads the
official SDM and TDM (SDM/ and TDM/pytorch_model.bin of the Hugging Face repository CodeGoat24/Face-diffuser)
under their canonical names, facediffuser_sdm.bin and facediffuser_tdm.bin, and installs an insightface pack
(buffalo_l from insightface's release, or antelopev2 from a source you give) flat in
models/insightface/models/<pack>/, whatever the layout inside its zip. Downloads go to a hidden `.partial`
file beside the target, resume where an interrupted one stopped (in the same run and in the next one), are
checked against the size and hash the hub publishes, and only then take the final name. What is already in
place and valid is skipped (a model placed by hand is compared with the hub's sha256 once, remembered by size
and mtime; --verify compares it again); a file that is in place but broken is reported, never overwritten. Ctrl-C
keeps what arrived and says so. Folders marked `is_default` in extra_model_paths.yaml receive the files. Run with
another Python than ComfyUI's, it goes on under ComfyUI's (as the check does). It ends with the first-run check's
verdict; exit status 0 when everything is in place.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from facediffuser_client import comfyui_python
from facediffuser_client.setup.flow import model_folders, set_up
from facediffuser_client.setup.insightface_steps import SOURCE_VARIABLE, packs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Download Face-diffuser's models and the insightface pack, and put them in place.")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI's folder (default: the ComfyUI this pack is installed in, or $COMFYUI_PATH)")
    parser.add_argument("--models-dir", type=Path, help="the models folder (default: <ComfyUI>/models)")
    parser.add_argument("--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML",
                        help="an extra_model_paths.yaml ComfyUI is started with (<ComfyUI>/extra_model_paths.yaml is always read)")
    parser.add_argument("--convert", action="store_true", help="also convert both models to fp16 .safetensors (smaller, faster to load)")
    parser.add_argument("--insightface-pack", choices=sorted(packs.KNOWN_PACK_FILES),
                        help=f"the insightface pack to install (default: {packs.DEFAULT_PACK}, unless a known pack is already installed)")
    parser.add_argument("--insightface-source", metavar="URL_OR_ZIP", default=os.environ.get(SOURCE_VARIABLE) or None,
                        help=f"where the pack's zip comes from: an address or a local file (default: ${SOURCE_VARIABLE}, "
                             f"else for {packs.DEFAULT_PACK} {packs.PACK_SOURCES[packs.DEFAULT_PACK]}; antelopev2 needs one)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, and do nothing")
    parser.add_argument("--verify", action="store_true",
                        help="compare the downloaded models in place with the hub's sha256 again, even those verified before "
                             "(a file altered without a change of size or date is found only so)")
    parser.add_argument(comfyui_python.OPTION, type=Path, dest="comfyui_python", metavar="PYTHON", help=comfyui_python.OPTION_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  %(message)s", stream=sys.stdout)

    def set_up_with(python: comfyui_python.ComfyUIPython) -> int:
        return set_up(args.comfyui, args.models_dir, tuple(args.extra_model_paths_config), convert=args.convert,
                      insightface_pack=args.insightface_pack, insightface_source=args.insightface_source, dry_run=args.dry_run,
                      verify=args.verify, python_found=python.found)

    try:
        root = model_folders.find_comfyui(args.comfyui)
        return comfyui_python.run_under_comfyuis_python(Path(__file__), argv, root, args.comfyui_python, set_up_with)
    except KeyboardInterrupt:  # before the set-up began; set_up says what it kept itself
        print("\ninterrupted before the set-up began: nothing was changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
