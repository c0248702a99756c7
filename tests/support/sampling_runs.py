"""What the ComfyUI-tier tests of sampling share: the seed of their runs and a count of each model's UNet evaluations."""

from __future__ import annotations

SEED = 3


class EvaluationLog:
    """Counts a model's UNet evaluations through a unet wrapper patch on a clone (which also proves that
    each model's own patches act inside the guider)."""

    def __init__(self, patcher):
        self.patcher = patcher.clone()
        self.calls = []  # (sigma, rows in the batch)
        self.patcher.set_model_unet_function_wrapper(self._wrapper)

    def _wrapper(self, apply_model, args):
        self.calls.append((float(args["timestep"][0]), args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    def rows(self):
        return sum(rows for _, rows in self.calls)


CONTROL_STRENGTH = 0.3  # a random tiny ControlNet at full strength swamps the tiny UNet


def apply_advanced(comfyui, positive, negative, control):
    net, hint = control
    return comfyui.run("ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=net, image=hint,
                       strength=CONTROL_STRENGTH, start_percent=0.0, end_percent=1.0)
