"""What the pack's development tools and its tests share: ComfyUI started in-process, tiny random models, a
simulated fleet and a counter of tensor traffic. It is part of dev/, which a user's install does not need (the
registry archive leaves it out, .comfyignore); like facediffuser_client, it reaches facediffuser_core through
facediffuser_client.pack.

    comfy_harness         ComfyUI in this process (COMFYUI_PATH), with the pack loaded as ComfyUI loads custom nodes
    tiny_comfy            tiny SD1.5-family ComfyUI models with random weights, and their conditionings
    official_checkpoints  tiny Face-diffuser checkpoints in the official key layout (diffusers and transformers)
    simulated_fleet       hundreds of simulated GPU workers with their faults, behind the batch client's worker pool
    tensor_traffic        host reads of tensor values and copies to a device or dtype, per model evaluation and place
"""
