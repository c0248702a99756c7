"""Postfuse against the SPEC formula written out with torch.nn.functional, on official-layout weights."""

import pytest
import torch

from facediffuser_core.postfuse import PostfuseModule, fuse_marked_rows
from spec_postfuse import spec_postfuse

DIM = 16


def official_layout_weights(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official checkpoint's key names and shapes (bf16 for some, as the file mixes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "mlp1.layernorm.weight": (2 * dim,), "mlp1.layernorm.bias": (2 * dim,),
        "mlp1.fc1.weight": (dim, 2 * dim), "mlp1.fc1.bias": (dim,),
        "mlp1.fc2.weight": (dim, dim), "mlp1.fc2.bias": (dim,),
        "mlp2.layernorm.weight": (dim,), "mlp2.layernorm.bias": (dim,),
        "mlp2.fc1.weight": (dim, dim), "mlp2.fc1.bias": (dim,),
        "mlp2.fc2.weight": (dim, dim), "mlp2.fc2.bias": (dim,),
        "layer_norm.weight": (dim,), "layer_norm.bias": (dim,),
    }
    weights = {f"postfuse_module.{key}": torch.randn(shape, generator=g) * 0.5 + (1.0 if key.endswith("norm.weight") else 0.0)
               for key, shape in shapes.items()}
    weights["postfuse_module.mlp1.fc1.weight"] = weights["postfuse_module.mlp1.fc1.weight"].bfloat16()
    return weights


def test_official_keys_load_and_forward_matches_the_formula():
    weights = official_layout_weights(DIM)
    module = PostfuseModule.from_state_dict(weights)
    assert module.dim == DIM
    t, e = torch.randn(5, DIM), torch.randn(5, DIM)
    torch.testing.assert_close(module(t, e), spec_postfuse(weights, t, e), rtol=1e-5, atol=1e-5)


def test_plain_load_state_dict_of_the_stripped_official_dict():
    weights = {key.removeprefix("postfuse_module."): value.float() for key, value in official_layout_weights(DIM).items()}
    module = PostfuseModule(DIM)
    module.load_state_dict(weights, strict=True)
    assert set(module.state_dict()) == set(weights)


def test_fuse_marked_rows_changes_exactly_the_marked_rows():
    weights = official_layout_weights(DIM, seed=1)
    module = PostfuseModule.from_state_dict(weights)
    hidden = torch.randn(2, 10, DIM, dtype=torch.float16)
    faces = torch.randn(2, DIM)
    positions = [7, 3]
    augmented = fuse_marked_rows(module, hidden, positions, faces)
    assert augmented.dtype == hidden.dtype and augmented.shape == hidden.shape
    others = [i for i in range(10) if i not in positions]
    assert torch.equal(augmented[:, others], hidden[:, others])
    for face, position in enumerate(positions):
        expected = spec_postfuse(weights, hidden[:, position].float(), faces[face].expand(2, DIM))
        torch.testing.assert_close(augmented[:, position].float(), expected, rtol=1e-2, atol=1e-2)
    assert not torch.equal(augmented[:, positions], hidden[:, positions])


def test_fuse_marked_rows_rejects_mismatches():
    module = PostfuseModule(DIM)
    hidden = torch.randn(1, 10, DIM)
    with pytest.raises(ValueError, match="one face embedding per marked position"):
        fuse_marked_rows(module, hidden, [1, 2], torch.randn(1, DIM))
    with pytest.raises(ValueError, match="outside the 10 token rows"):
        fuse_marked_rows(module, hidden, [10], torch.randn(1, DIM))
    with pytest.raises(ValueError, match="same token"):
        fuse_marked_rows(module, hidden, [4, 4], torch.randn(2, DIM))
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(3, DIM), torch.randn(3, DIM + 1))


def test_missing_postfuse_weights_are_named():
    with pytest.raises(ValueError, match="postfuse_module.layer_norm.weight"):
        PostfuseModule.from_state_dict({"unet.conv_in.weight": torch.zeros(1)})
