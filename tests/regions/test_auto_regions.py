"""facediffuser_core.auto_regions: person regions from face boxes, their order, their masks, the fallback, and
a real detection (the tests' insightface pack, tests/support/insightface_test_pack.py) on a picture of two real people."""

import numpy as np
import pytest
import torch

from facediffuser_core import auto_regions


def test_a_face_widens_to_a_person_down_to_the_bottom():
    assert auto_regions.person_box((40, 20, 60, 50), 200, 100) == (20, 0, 80, 100)  # 20 wide, 30 high: up by 30, clipped
    assert auto_regions.person_box((40, 40, 60, 50), 200, 100, expansion=0.5) == (30, 35, 70, 100)
    assert auto_regions.person_box((5, 40, 25, 50), 30, 100) == (0, 30, 30, 100)  # clipped to the picture
    assert auto_regions.person_box((40, 40, 60, 50), 200, 100, expansion=0) == (40, 40, 60, 100)
    with pytest.raises(ValueError, match="the expansion must be 0 or more"):
        auto_regions.person_box((40, 40, 60, 50), 200, 100, expansion=-1)
    with pytest.raises(ValueError, match="empty face box"):
        auto_regions.person_box((40, 40, 40, 50), 200, 100)


def test_subjects_get_the_largest_faces_left_to_right_and_overlaps_are_split():
    right, left, small = (120, 20, 160, 60), (30, 30, 60, 60), (90, 5, 96, 11)
    found = auto_regions.decide([right, small, left], subjects=2, width=200, height=100)
    assert not found.fallback and len(found.faces) == 3
    # left: 30 wide -> 0..90; right: 40 wide -> 80..200; they overlap in 80..90, split at (45 + 140) / 2 = 92.5,
    # which the left one does not reach.
    assert found.persons == ((0.0, 0.0, 90.0, 100.0), (92.5, 0.0, 200.0, 100.0))
    assert found.masks.shape == (2, 100, 200)
    assert found.masks[0, :, :90].min() == 1 and found.masks[0, :, 90:].max() == 0
    assert found.masks[1, :, 92:].min() == 1 and found.masks[1, :, :92].max() == 0  # pixel 92 is centred at 92.5
    assert "subject regions left to right, in marker order: (0, 0, 90, 100), (92, 0, 200, 100)" in found.describe()
    close = auto_regions.decide([(60, 30, 80, 50), (100, 30, 120, 50)], subjects=2, width=200, height=100)
    assert close.persons[0][2] == close.persons[1][0] == 90  # the faces' centres 70 and 110
    assert not (close.masks[0].bool() & close.masks[1].bool()).any()


def test_box_masks_take_the_pixels_whose_centres_are_inside():
    masks = auto_regions.box_masks([(0.4, 0, 2.6, 1), (2.5, 0.5, 4, 3)], 4, 3)
    assert masks[0].tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert masks[1].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_fewer_faces_than_markers_fall_back_to_no_regions():
    found = auto_regions.decide([(10, 10, 30, 30)], subjects=2, width=100, height=100)
    assert found.fallback and found.masks is None and found.persons is None
    assert "found 1 face(s) for 2 <|image|> marker(s)" in found.describe() and "without regions" in found.describe()
    assert auto_regions.decide([], subjects=1, width=100, height=100).fallback
    assert not auto_regions.decide([(10, 10, 30, 30)], subjects=1, width=100, height=100).fallback


@pytest.fixture(scope="module")
def face_analysis(tmp_path_factory):
    pytest.importorskip("insightface")
    from insightface.app import FaceAnalysis

    from insightface_test_pack import write_detector_pack

    pack = write_detector_pack(tmp_path_factory.mktemp("pack") / "detector")
    analysis = FaceAnalysis(name=str(pack), providers=["CPUExecutionProvider"])
    analysis.prepare(ctx_id=-1, det_size=(640, 640))
    return analysis


def detect(analysis, rgb):
    return [tuple(float(v) for v in face.bbox[:4]) for face in analysis.get(np.ascontiguousarray(rgb[:, :, ::-1]))]


def test_a_real_detector_finds_two_people_left_to_right(face_analysis):
    """The astronaut's portrait left of one of t1.jpg's people: two regions, the first over her face."""
    import skimage.data

    from face_photos import face_photo, insightface_image, side_by_side

    astronaut = skimage.data.astronaut()
    group = insightface_image("t1.jpg")
    portraits = []
    for photo in (astronaut, group):
        largest = max(detect(face_analysis, photo), key=lambda box: (box[2] - box[0]) * (box[3] - box[1]))
        portraits.append(face_photo(photo, largest, margin=0.5))
    picture = side_by_side(*portraits, size=256)  # 512 x 256: each person in their own half
    faces = detect(face_analysis, picture)
    assert len(faces) == 2
    found = auto_regions.decide(faces, subjects=2, width=512, height=256)
    assert not found.fallback
    for subject, (x1, y1, x2, y2) in enumerate(sorted(faces)):
        centre_x, centre_y = round((x1 + x2) / 2), round((y1 + y2) / 2)
        assert (centre_x < 256) == (subject == 0)  # the astronaut on the left is subject 1
        assert found.masks[subject, centre_y, centre_x] == 1 and found.masks[1 - subject, centre_y, centre_x] == 0
    assert found.masks[0, :, :200].sum() > found.masks[0, :, 312:].sum() and found.masks[1, :, 312:].sum() > found.masks[1, :, :200].sum()
    # Mirrored, the person from t1.jpg stands on the left and becomes subject 1.
    (x1, y1, x2, y2) = sorted(faces)[1]
    flipped = auto_regions.decide(detect(face_analysis, np.ascontiguousarray(picture[:, ::-1])), subjects=2, width=512, height=256)
    assert flipped.masks[0, round((y1 + y2) / 2), 511 - round((x1 + x2) / 2)] == 1


def test_the_saliency_view_outlines_the_regions_and_changes_nothing_without():
    from facediffuser_core import saliency_view, snf

    summary = snf.SaliencySummary(torch.rand(1, 4, 8), torch.rand(1, 4, 8), torch.rand(1, 4, 8))
    image = torch.rand(1, 32, 64, 3)
    plain, mask = saliency_view.render(summary, (32, 64), image=image)
    regions = auto_regions.box_masks([(0, 8, 24, 64), (40, 0, 64, 64)], 128, 64)  # drawn at twice the panel size
    outlined, outlined_mask = saliency_view.render(summary, (32, 64), image=image, regions=regions)
    assert torch.equal(outlined_mask, mask) and outlined.shape == plain.shape == (4, 32, 64, 3)
    first, second = saliency_view.REGION_COLOURS[:2]
    for panel in outlined:
        assert torch.equal(panel[4, 5], first) and torch.equal(panel[20, 11], first)  # the top and right edges of region 1
        assert torch.equal(panel[10, 20], second)  # the left edge of region 2
    changed = (outlined != plain).any(dim=-1)
    assert not changed[:, 6:, :10].any() and not changed[:, :, 13:19].any()  # inside region 1, between the regions
