"""SPEC.md's postfuse formula written out with torch.nn.functional, independent of the pack's module."""

import torch
import torch.nn.functional as F


def spec_postfuse(w: dict[str, torch.Tensor], t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    w = {key.removeprefix("postfuse_module."): value.float() for key, value in w.items()}

    def norm(x, name):
        return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    def mlp(x, name):
        hidden = F.gelu(F.linear(norm(x, f"{name}.layernorm"), w[f"{name}.fc1.weight"], w[f"{name}.fc1.bias"]))
        return F.linear(hidden, w[f"{name}.fc2.weight"], w[f"{name}.fc2.bias"])

    first = mlp(torch.cat([t, e], dim=-1), "mlp1") + t
    second = first + mlp(first, "mlp2")
    return norm(second, "layer_norm")
