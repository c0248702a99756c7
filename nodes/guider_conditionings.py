"""The three conditionings of the collaboration as the guider hands them to its two models: checked against each
model's width, and a ControlNet on any of them present on all of them."""

from __future__ import annotations


def check_width(input_name: str, conditioning, model_name: str, patcher) -> None:
    """A conditioning from another model family (an SDXL CLIP, say) fails deep in the UNet otherwise."""
    expected = patcher.model.model_config.unet_config.get("context_dim")
    for tensor, _ in conditioning:
        if expected is not None and tensor.shape[-1] != expected:
            raise ValueError(
                f"the '{input_name}' conditioning is {tensor.shape[-1]} wide but the {model_name.upper()} takes {expected}: "
                "encode all three prompts with the CLIP of the Face-diffuser SDM Loader"
            )


def share_controls(augmented: list, text: list, null: list) -> tuple[list, list, list]:
    """The three conditionings with a ControlNet on any of them present on all of them.

    Apply ControlNet puts its control on the conditionings it is wired to (usually `text`, or `augmented`
    and `text`), and ComfyUI gives a KSampler's negative the positive's control only in some cases. For
    Face-diffuser the three are one prompt: each model's guidance must compare branches that both carry the
    control, as KSampler's do, or the control itself becomes guidance (and the TDM's two branches could not
    share one UNet batch). A conditioning without a control takes the controls of `text`, else `augmented`,
    else `null`, entry by entry; conditionings that carry their own are left as they are.
    """
    conditionings = {"augmented": augmented, "text": text, "null": null}

    def controls(conditioning):
        return [entry[1]["control"] for entry in conditioning if entry[1].get("control") is not None and "area" not in entry[1]]

    source = next((controls(conditionings[name]) for name in ("text", "augmented", "null") if controls(conditionings[name])), None)
    if source is None:
        return augmented, text, null
    shared = {}
    for name, conditioning in conditionings.items():
        if controls(conditioning):
            shared[name] = conditioning
            continue
        filled, index = [], 0
        for tensor, options in conditioning:
            if "area" not in options:
                options = {**options, "control": source[index % len(source)]}
                index += 1
            filled.append([tensor, options])
        shared[name] = filled
    return shared["augmented"], shared["text"], shared["null"]
