"""The pack's ComfyUI client, standard library only, behind scripts/facediffuser_run.py (one workflow on one server)
and scripts/facediffuser_batch.py (a jobs file across servers). The scripts import it as a sibling package:
`python scripts/<script>.py` puts scripts/ first on sys.path.

    http_api     ComfyUI's HTTP API (ComfyClient), the errors a run ends in, reading a run's history
    api_workflow API-format workflows, the overrides by node type, the shipped workflows
    own_comfyui  a ComfyUI the client starts itself when none answers
    files        pictures on disk, never written over another file
    best_of_n    ranking pictures by the Identity Score node
    headless     one workflow on one server (the headless runner)
    jobs         the batch's jobs file
    manifest     the batch's manifest.json and the states of its runs
    scheduler    the batch's dispatch to servers, retries and progress
"""
