"""Face-crop geometry, and the official preprocessing against an independent PIL/numpy implementation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from facediffuser_core.face_crop import (
    CLIP_MEAN,
    CLIP_STD,
    choose_face,
    crop,
    faces_left_to_right,
    preprocess_reference_faces,
    square_crop_box,
)

BOXES = [(300, 40, 380, 150), (10, 60, 60, 120), (150, 20, 260, 160)]  # middle-sized, small, largest


def test_choose_largest_and_by_index_left_to_right():
    assert choose_face(BOXES, "largest") == 2
    assert faces_left_to_right(BOXES) == [1, 2, 0]
    assert [choose_face(BOXES, "index", i) for i in range(3)] == [1, 2, 0]
    with pytest.raises(ValueError, match="face index 3 asked for, but only 3 faces were found"):
        choose_face(BOXES, "index", 3)
    with pytest.raises(ValueError, match="no face"):
        choose_face([], "largest")


def test_square_crop_box_examples():
    # 100x120 face, margin 0.25 -> a 180 square around the centre (200, 100)
    assert square_crop_box((150, 40, 250, 160), 512, 400, 0.25) == (110, 10, 290, 190)
    # the same near the top edge is shifted down to stay inside
    assert square_crop_box((150, 10, 250, 130), 512, 400, 0.25) == (110, 0, 290, 180)
    # a box larger than the image's short side shrinks to it
    assert square_crop_box((0, 0, 300, 300), 400, 200, 0.5) == (50, 0, 250, 200)
    with pytest.raises(ValueError, match="margin must be 0 or more"):
        square_crop_box((0, 0, 10, 10), 100, 100, -0.1)


@pytest.mark.slow  # 6.0 s here
@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(16, 900), height=st.integers(16, 900),
    fx=st.floats(0, 1), fy=st.floats(0, 1), fw=st.floats(0.02, 1), fh=st.floats(0.02, 1),
    margin=st.floats(0, 1.5),
)
def test_square_crop_box_properties(width, height, fx, fy, fw, fh, margin):
    x1, y1 = fx * (width - 2), fy * (height - 2)
    x2, y2 = min(width, x1 + 1 + fw * width), min(height, y1 + 1 + fh * height)
    left, top, right, bottom = square_crop_box((x1, y1, x2, y2), width, height, margin)
    side = right - left
    assert side == bottom - top >= 1
    assert 0 <= left and right <= width and 0 <= top and bottom <= height
    wanted = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    assert side == min(round(wanted), width, height) or side == 1
    if wanted <= min(width, height) - 2:  # room to spare: the face box lies inside the crop, up to rounding
        assert left <= x1 + 1 and right >= x2 - 1 and top <= y1 + 1 and bottom >= y2 - 1


def reference_preprocess(image01: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Written from SPEC.md with numpy and PIL (float mode 'F', whose bilinear resize is antialiased)."""
    pixels = np.round(image01 * 255).astype(np.uint8)
    height, width, _ = pixels.shape
    pad = abs(height - width) // 2
    if height > width:
        canvas = np.zeros((height, width + 2 * pad, 3), np.uint8)
        canvas[:, pad:pad + width] = pixels
    else:
        canvas = np.zeros((height + 2 * pad, width, 3), np.uint8)
        canvas[pad:pad + height] = pixels

    def resize(channels: np.ndarray, size: int) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(channels[..., c].astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
                         for c in range(3)], axis=-1)

    object_image = np.clip(np.round(resize(canvas.astype(np.float32), resolution)), 0, 255) / 255
    clip_input = (resize(object_image.astype(np.float32), 224) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return clip_input.transpose(2, 0, 1), object_image


@pytest.mark.parametrize("height, width, resolution", [(300, 200, 512), (201, 350, 512), (512, 512, 512), (90, 61, 512), (640, 480, 256)])
def test_preprocessing_matches_an_independent_implementation(height, width, resolution):
    rng = np.random.default_rng(height * 1000 + width)
    # uint8 levels divided by 255, as ComfyUI's image loader gives them, plus a smooth gradient so the
    # resize has structure to get wrong
    levels = rng.integers(0, 256, size=(height, width, 3)).astype(np.float64)
    levels = np.round(0.5 * levels + 0.5 * 255 * np.linspace(0, 1, width)[None, :, None])
    image = levels / 255
    clip_input, objects = preprocess_reference_faces([torch.from_numpy(image).float()], resolution)
    expected_clip, expected_object = reference_preprocess(image, resolution)
    assert clip_input.shape == (1, 3, 224, 224) and objects.shape == (1, resolution, resolution, 3)
    object_diff = np.abs(objects[0].numpy() - expected_object) * 255
    # rounding to uint8 may fall on the other side of .5 where the two float resizes differ by ~1e-5
    assert object_diff.max() <= 1.0 + 1e-4 and (object_diff > 1e-3).mean() < 1e-3
    np.testing.assert_allclose(clip_input[0].numpy(), expected_clip, atol=0.02)
    assert np.abs(clip_input[0].numpy() - expected_clip).mean() < 1e-4


def test_padding_is_black_and_centred():
    image = torch.ones(100, 40, 3)  # white, tall: 30 black columns each side
    _, objects = preprocess_reference_faces([image], 100)
    assert torch.all(objects[0, :, :29] == 0) and torch.all(objects[0, :, 71:] == 0)
    assert torch.all(objects[0, :, 31:69] == 1)


def test_several_faces_of_different_sizes_batch():
    clip_input, objects = preprocess_reference_faces([torch.rand(50, 70, 3), torch.rand(300, 120, 3)], 64)
    assert clip_input.shape == (2, 3, 224, 224) and objects.shape == (2, 64, 64, 3)


def test_crop_cuts_the_box():
    image = torch.arange(20 * 30 * 3, dtype=torch.float32).reshape(20, 30, 3)
    assert torch.equal(crop(image, (5, 2, 15, 12)), image[2:12, 5:15])
