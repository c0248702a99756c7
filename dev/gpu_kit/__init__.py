"""The GPU kit: everything a GPU can tell about the pack, measured by one prepared command on a machine that
reaches no network (docs: the GPU kit page).

    prepare       here: the ComfyUI tree and the wheels the GPU image lacks, into .gpu-kit/
    run.sh        there: installs the carried wheels into a private folder and runs the measurements
    __main__      the measurements' conductor: one worker process after another, each measurement on a budget
    worker        one ComfyUI in one process, running measurements in turn
    measurements  one module per measurement
    report        the JSON file and the Markdown table
    image         the GPU machine's image and what the kit carries to it
"""
