"""What the pack's development commands and its tests share: ComfyUI started in-process and tiny random
models. scripts/measure_convert_memory.py imports it as a sibling package (`python scripts/<script>.py` puts
scripts/ first on sys.path), the tools in dev/ through PYTHONPATH=scripts, the tests through tests/pytest.ini's
pythonpath;
like facediffuser_client, it reaches facediffuser_core through facediffuser_client.pack.

    comfy_harness         ComfyUI in this process (COMFYUI_PATH), with the pack loaded as ComfyUI loads custom nodes
    tiny_comfy            tiny SD1.5-family ComfyUI models with random weights, and their conditionings
    official_checkpoints  tiny Face-diffuser checkpoints in the official key layout (diffusers and transformers)
    simulated_fleet       hundreds of simulated GPU workers with their faults, behind the batch client's worker pool
    tensor_traffic        host reads of tensor values and copies to a device or dtype, per model evaluation and place
"""
