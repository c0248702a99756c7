"""The postfuse module (FastComposer's fusion MLP) that writes a reference face into a prompt token.

The SDM's prompt carries each subject at one token: the last token of the noun the user marked. That
token's text hidden state h and the face's image embedding e (both D = 768 wide for SD1.5) become
    postfuse(h, e) = layer_norm(mlp2(mlp1([h, e]) + h))
with mlp1: LayerNorm(2D) -> Linear(2D, D) -> GELU -> Linear(D, D) and
     mlp2: x + (LayerNorm(D) -> Linear(D, D) -> GELU -> Linear(D, D))(x).
Attribute names follow the official checkpoint, so its `postfuse_module.*` tensors load with the prefix
stripped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

STATE_DICT_PREFIX = "postfuse_module."


class _FusionMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual fusion MLP needs equal input and output widths, got {in_dim} and {out_dim}")
        self.residual = residual
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.layernorm(x))))
        return x + out if self.residual else out


class PostfuseModule(nn.Module):
    """postfuse(text_hidden_rows, face_embeddings): (..., D) and (..., D) -> (..., D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp1 = _FusionMLP(2 * dim, dim, residual=False)
        self.mlp2 = _FusionMLP(dim, dim, residual=True)
        self.layer_norm = nn.LayerNorm(dim)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "PostfuseModule":
        """Build from the postfuse tensors (official `postfuse_module.` prefix optional), width read from them.

        The module keeps float32 weights whatever the file's dtype (the official file mixes fp32 and bf16):
        it is small, and `fuse_marked_rows` runs it in float32 anyway.
        """
        stripped = {
            (key[len(STATE_DICT_PREFIX):] if key.startswith(STATE_DICT_PREFIX) else key): value
            for key, value in state_dict.items()
        }
        if "layer_norm.weight" not in stripped:
            raise ValueError(
                "no postfuse weights found: expected keys like 'postfuse_module.layer_norm.weight' "
                f"(got {len(stripped)} keys, e.g. {sorted(stripped)[:3]})"
            )
        module = cls(int(stripped["layer_norm.weight"].shape[0]))
        module.load_state_dict({key: value.float() for key, value in stripped.items()}, strict=True)
        return module

    def forward(self, text_hidden_rows: torch.Tensor, face_embeddings: torch.Tensor) -> torch.Tensor:
        if text_hidden_rows.shape != face_embeddings.shape or text_hidden_rows.shape[-1] != self.dim:
            raise ValueError(
                f"postfuse needs text rows and face embeddings of the same shape (..., {self.dim}), "
                f"got {tuple(text_hidden_rows.shape)} and {tuple(face_embeddings.shape)}"
            )
        fused = self.mlp1(torch.cat([text_hidden_rows, face_embeddings], dim=-1)) + text_hidden_rows
        return self.layer_norm(self.mlp2(fused))


def fuse_marked_rows(
    postfuse: PostfuseModule,
    hidden_states: torch.Tensor,
    positions: Sequence[int],
    face_embeddings: torch.Tensor,
) -> torch.Tensor:
    """The augmented conditioning: a copy of hidden_states (B, T, D) whose row positions[k] becomes
    postfuse(row, face_embeddings[k]) in every batch item; all other rows are unchanged.

    Postfuse runs in float32 on the hidden states' device (its LayerNorms are the sensitive part in fp16)
    and the result is cast back to the hidden states' dtype.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"expected hidden states (batch, tokens, width), got shape {tuple(hidden_states.shape)}")
    if face_embeddings.dim() != 2 or face_embeddings.shape[0] != len(positions):
        raise ValueError(
            f"expected one face embedding per marked position: {len(positions)} positions, "
            f"face embeddings of shape {tuple(face_embeddings.shape)}"
        )
    if len(set(positions)) != len(positions):
        raise ValueError(f"two subjects are marked on the same token (positions {list(positions)})")
    tokens = hidden_states.shape[1]
    for position in positions:
        if not 0 <= position < tokens:
            raise ValueError(f"marked position {position} is outside the {tokens} token rows")
    augmented = hidden_states.clone()
    if not positions:
        return augmented
    index = torch.tensor(list(positions), device=hidden_states.device, dtype=torch.long)
    rows = hidden_states[:, index].float()
    faces = face_embeddings.to(device=hidden_states.device, dtype=torch.float32).unsqueeze(0).expand_as(rows)
    postfuse = postfuse.to(device=hidden_states.device, dtype=torch.float32)
    augmented[:, index] = postfuse(rows, faces).to(hidden_states.dtype)
    return augmented
