"""The first-run check: what is installed and in place, and the fix for what is not. It only reads, and needs nothing
but the standard library, so that it also runs, and says what is missing, on a bare Python (torch, insightface and
onnxruntime are imported only to be checked).

    findings                    a finding (ok, missing, problem, note), and those that need the user's action
    environment                 this Python, ComfyUI and its version, ComfyUI's requirements, torch and its device
    comfyui_requirements_probe  run by `environment` in a process of ComfyUI's Python: what ComfyUI imports at start
    insightface_onnxruntime     insightface, the onnxruntime build for this machine, the execution providers that work
    model_files                 the SDM and TDM checkpoints, the insightface packs and their recognition model
    report                      every finding in order, what blocks which shipped workflow, the printed report
"""
