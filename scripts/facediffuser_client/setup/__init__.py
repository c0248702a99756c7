"""The set-up: Face-diffuser's weights from the Hugging Face hub and an insightface pack, each downloaded beside its
target, resumed, verified against the size and hash the hub publishes, and only then put in place; then the
first-run check's verdict.

    steps              a step of the set-up, and the error that ends one
    downloads          resumable downloads beside the target, verified against the hub's size and hash
    download_progress  a download's progress line
    model_steps        the SDM and TDM: in place and verified, or downloaded; converted to fp16 when asked
    insightface_steps  an insightface pack: in place, or installed (or completed) from its zip
    flow               the set-up from start to end: plan, carry out, what an interruption kept, the check's verdict
"""
