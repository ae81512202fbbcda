"""The partition family's default core coordinates (docs/math.md §3): all channels of a position,
then the next, in a spiral out from the image centre, as flat NCHW indices ``c·H·W + i·W + j``.

The expected orders are written out by hand: Chebyshev rings around the centre
``((H − 1)/2, (W − 1)/2)``, each walked clockwise on screen (rows grow downwards) along its
top row to the right, down the right column, back along the bottom row and up the left column.
"""

import itertools

import torch

from aefrl.obs_models import make_obs_model
from aefrl.obs_models.aef import spiral_core_indices

# 4x4, centre (1.5, 1.5): the 2x2 centre block, then the 12 positions of the outer ring.
ORDER_4X4 = [
    (1, 1), (1, 2), (2, 2), (2, 1),
    (1, 0), (0, 0), (0, 1), (0, 2), (0, 3), (1, 3),
    (2, 3), (3, 3), (3, 2), (3, 1), (3, 0), (2, 0),
]  # fmt: skip
# 5x5, centre (2, 2): the centre pixel, then the 3x3 ring (its first 9 positions).
ORDER_5X5_HEAD = [
    (2, 2),
    (1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1), (2, 1),
]  # fmt: skip


def _nchw(positions, channels, height, width):
    """Every channel of each position, consecutively, as flat NCHW indices."""
    return [c * height * width + i * width + j for i, j in positions for c in range(channels)]


def _decode(flat, height, width):
    """Flat NCHW index -> (c, i, j), by integer division (not by the code under test)."""
    c, rest = divmod(int(flat), height * width)
    i, j = divmod(rest, width)
    return c, i, j


def test_spiral_order_on_a_3x4x4_image_is_the_hand_written_one():
    """Fails if the indices are channels-last (``(i·W + j)·C + c``), if a position's channels are
    not consecutive, or if the spiral starts anywhere but the centre (e.g. the corner (0, 0))."""
    got = spiral_core_indices((3, 4, 4), 48).tolist()
    assert got == _nchw(ORDER_4X4, 3, 4, 4)
    # The first position spelled out: pixel (1, 1) of channels 0, 1, 2 of a 4x4 image.
    assert got[:3] == [5, 21, 37]
    # A prefix is the first d of the same order (the model takes d of them).
    assert spiral_core_indices((3, 4, 4), 7).tolist() == got[:7]


def test_spiral_order_on_an_odd_sized_image_starts_at_the_centre_pixel():
    """Odd sizes have one centre pixel: it comes first, then its 8 neighbours in a ring."""
    got = spiral_core_indices((2, 5, 5), 18).tolist()
    assert got == _nchw(ORDER_5X5_HEAD, 2, 5, 5)
    assert got[:2] == [12, 37]  # (2, 2) in channel 0, then in channel 1


def test_spiral_order_on_a_64x64_image_begins_with_the_centre_block():
    got = spiral_core_indices((3, 64, 64), 12).tolist()
    centre = [(31, 31), (31, 32), (32, 32), (32, 31)]
    assert got == _nchw(centre, 3, 64, 64)


def test_spiral_properties_over_whole_images():
    """Over every position of square, odd and non-square images: a permutation of all
    coordinates, all channels of a position consecutive (channel 0 first), rings (Chebyshev
    distance from the centre) non-decreasing, and consecutive positions within a ring adjacent
    (a walk, not a jump across the ring)."""
    for shape in [(3, 4, 4), (2, 5, 5), (1, 7, 7), (2, 3, 6), (3, 6, 4)]:
        channels, height, width = shape
        num = channels * height * width
        idx = spiral_core_indices(shape, num).tolist()
        assert sorted(idx) == list(range(num)), shape
        decoded = [_decode(k, height, width) for k in idx]
        positions = []
        for p in range(height * width):
            block = decoded[p * channels : (p + 1) * channels]
            assert [c for c, _, _ in block] == list(range(channels)), shape
            assert len({(i, j) for _, i, j in block}) == 1, shape
            positions.append(block[0][1:])
        ci, cj = (height - 1) / 2, (width - 1) / 2
        rings = [max(abs(i - ci), abs(j - cj)) for i, j in positions]
        assert rings == sorted(rings), shape
        for (a, b), ra, rb in zip(itertools.pairwise(positions), rings, rings[1:]):
            if ra == rb and height == width:
                assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1, (shape, a, b)


def test_partition_model_default_core_is_the_spiral():
    """The model's default ``core_idx`` is the first d coordinates of the hand-written order."""
    model = make_obs_model("aef_partition", (3, 4, 4), 5, 0, depth=2, hidden=8)
    assert model.core_idx.tolist() == _nchw(ORDER_4X4, 3, 4, 4)[:5]
    assert torch.equal(model.core_idx, spiral_core_indices((3, 4, 4), 5))
