"""Face-diffuser for ComfyUI: two Stable Diffusion 1.5 models paint a scene and the people in it together.

ComfyUI imports this folder as a custom node pack and calls `comfy_entrypoint`; the algorithms live in
`facediffuser_core` (plain PyTorch) and the ComfyUI glue in `nodes`.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
