"""The pack's client code, behind the thin command lines in scripts/: facediffuser_run.py (one workflow on one
server), facediffuser_batch.py (a jobs file across servers), facediffuser_check.py (the first-run check) and
facediffuser_setup.py (the set-up). The scripts import it as a sibling package: `python scripts/<script>.py` puts
scripts/ first on sys.path. Standard library only, but for Ray (--ray), the set-up's downloads (huggingface_hub)
and conversion (torch), and what the check checks, each imported when it is needed.

    pack         the pack's folder, and facediffuser_core's modules shared with the nodes
    http_api     ComfyUI's HTTP API (ComfyClient), the errors a run ends in, reading a run's history
    api_workflow API-format workflows, the overrides by node type, the shipped workflows
    own_comfyui  a ComfyUI the client starts itself (the runner's, a Ray worker's, the tests' servers)
    end_with_parent  run as a launcher: a ComfyUI that the kernel kills when the process that started it dies
    files        pictures on disk, never written over another file
    best_of_n    ranking pictures by the Identity Score node
    progress     a run's step progress from ComfyUI's websocket, shown as a bar
    server_log   what the pack's nodes log during a run, from ComfyUI's log stream on the same websocket
    regions      the runner's --regions and --boxes: the shipped workflow they pick, the layout they set
    headless     one workflow on one server (the headless runner)
    jobs         the batch's jobs file
    manifest     the batch's manifest (manifest.sqlite, and its copy manifest.json) and the states of its runs
    executor     where the batch's scheduler and its executors meet: the interfaces both sides implement
    scheduler    the batch's scheduler: dispatch to an executor, retries, pictures, best-of-N and progress
    servers      the batch's executor for ComfyUI servers a user runs (--server)
    worker_pool  the batch's executor over workers that own a ComfyUI: replacing the lost, broken and hung
    ray_workers  those workers on a Ray cluster (--ray), the only module that imports Ray
    check/       the first-run check: what is installed and in place, and the fix for what is not (its modules: check/__init__.py)
    setup/       the set-up: the models and an insightface pack downloaded, verified and put in place (its modules: setup/__init__.py)
    verified_records  the model files whose content the set-up compared with the hub's hash, read by the check too
"""
