"""Python imports this at start-up when its folder is on PYTHONPATH (the kit's --as-gpu-image rehearsal puts it
there for every process of the run): only the GPU image's packages and the kit's carried ones can be imported."""

from dev.gpu_kit import image_only

image_only.refuse_what_the_image_lacks()
