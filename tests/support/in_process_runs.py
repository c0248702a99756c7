"""An API workflow run through ComfyUI's own validation and PromptExecutor in this process, as its server would run
a queued prompt, for the ComfyUI tier."""

from __future__ import annotations

import asyncio
import collections


class _Server:
    """What PromptExecutor needs of ComfyUI's server when nobody listens."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def run_in_process(comfyui, workflow: dict):
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("run", workflow, None))
    assert valid, (error, node_errors)
    # ComfyUI's main.py fills cache_args from its command line, and newer versions read more keys from it
    # ("ram_inactive" from 0.33); 0 is main.py's value for every one of them when no RAM cache is asked for.
    cache_args = collections.defaultdict(float, lru=0, ram=0)
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC, cache_args=cache_args)
    executor.execute(workflow, "run", {}, outputs)
    failures = [data for event, data in executor.status_messages if event == "execution_error"]
    assert executor.success, failures
    return executor.history_result["outputs"]
