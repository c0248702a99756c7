"""Face-diffuser for ComfyUI: two Stable Diffusion 1.5 models paint a scene and the people in it together.

ComfyUI imports this folder as a custom node pack and calls `comfy_entrypoint`; the algorithms live in
`facediffuser_core` (plain PyTorch) and the ComfyUI glue in `nodes`.
"""

from .nodes import comfy_entrypoint

# ComfyUI serves this folder at /extensions/<the pack's folder name>/ for V3 packs too; the frontend's node help
# panel fetches web/docs/<node id>.md from there.
WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
