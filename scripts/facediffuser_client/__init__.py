"""The pack's client code, behind the thin command lines in scripts/: facediffuser_run.py (one workflow on one
server), facediffuser_batch.py (a jobs file across servers), facediffuser_check.py (the first-run check) and
facediffuser_setup.py (the set-up). The scripts import it as a sibling package: `python scripts/<script>.py` puts
scripts/ first on sys.path. Standard library only, but for Ray (--ray), the set-up's downloads (huggingface_hub)
and conversion (torch), and what the check checks, each imported when it is needed.

    pack         the pack's folder, and facediffuser_core's modules shared with the nodes
    http_api     ComfyUI's HTTP API (ComfyClient), the errors a run ends in, reading a run's history
    api_workflow API-format workflows, the overrides by node type, the shipped workflows
    own_comfyui  a ComfyUI the client starts itself when none answers
    files        pictures on disk, never written over another file
    best_of_n    ranking pictures by the Identity Score node
    progress     a run's step progress from ComfyUI's websocket, shown as a bar
    server_log   what the pack's nodes log during a run, from ComfyUI's log stream on the same websocket
    regions      the runner's --regions and --boxes: the shipped workflow they pick, the layout they set
    headless     one workflow on one server (the headless runner)
    jobs         the batch's jobs file
    manifest     the batch's manifest.json and the states of its runs
    scheduler    the batch's dispatch to an executor, retries and progress
    servers      the batch's executor for ComfyUI servers a user runs (--server)
    ray_workers  the batch's executor on a Ray cluster (--ray)
    check/       the first-run check: what is installed and in place, and the fix for what is not (its modules: check/__init__.py)
    setup/       the set-up: the models and an insightface pack downloaded, verified and put in place (its modules: setup/__init__.py)
    verified_records  the model files whose content the set-up compared with the hub's hash, read by the check too
"""
