"""LOST as published (analysis.lost): seed, expansion, mask and box by hand; the paper's settings; the sites it reads."""

import pytest
import torch

from test_time_registers import InvalidArgumentError
from test_time_registers.analysis.lost import LOST_PRESETS, PAPER_BIASES, LostSettings, lost_boxes

# A 2 x 3 grid: four background patches (1, 0) and an object in column 2, (-1, 1) above (-1, 2).
#   affinity: background-background 1, background-object -1 and -1, object 2 (top), 3 (between), 5 (bottom)
HAND = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 1.0],
                     [1.0, 0.0], [1.0, 0.0], [-1.0, 2.0]])


def test_the_seed_expansion_and_box_equal_a_hand_computed_case():
    # degrees (positive links to other patches): background 3 each, object 1 each -> the seed is the first
    # object patch, (row 0, col 2); its expansion is {2, 5}; summed affinity: background -2, object 5 and 8.
    (answer,) = lost_boxes(HAND[None], (2, 3))
    assert answer.seed == (0, 2)
    assert answer.box == (2, 0, 3, 2) and not answer.seed_only


def test_a_bias_shifts_every_affinity_before_thresholding():
    # + 2.5: every affinity is positive, every degree 5, the seed patch 0, and the mask the whole grid.
    (answer,) = lost_boxes(HAND[None], (2, 3), bias=2.5)
    assert answer.seed == (0, 0) and answer.box == (0, 0, 3, 2)


def test_zero_affinity_is_not_a_link():
    """The official code counts strictly positive affinities; orthogonal patches are not linked."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])   # patch 1 is orthogonal to all
    (answer,) = lost_boxes(features[None], (2, 2))
    assert answer.seed == (0, 1) and answer.box == (1, 0, 2, 1)


def test_the_box_is_the_seeds_connected_part_of_the_mask():
    """A 6 x 6 grid: background patches share one direction; a 2 x 3 object and a 1-patch speck oppose it.
    The speck is not 4-connected to the object, so the box holds the seed's part of the mask only."""
    torch.manual_seed(0)
    background, thing = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])
    features = background.repeat(36, 1) + 0.01 * torch.randn(36, 3)
    grid = torch.arange(36).reshape(6, 6)
    features[grid[1:3, 2:5].flatten()] = thing
    features[grid[5, 0]] = thing + torch.tensor([0.0, 0.0, 0.5])   # fewer positive links: it is not the seed
    (answer,) = lost_boxes(features[None], (6, 6))
    assert answer.box == (2, 1, 5, 3)


def test_a_batch_gives_each_image_its_own_answer_and_normalising_ignores_scale():
    batch = torch.stack([HAND, HAND.flip(0)])
    first, second = lost_boxes(batch, (2, 3))
    assert first.box == (2, 0, 3, 2) and second.box == (0, 0, 1, 2)   # the flipped grid puts the object in column 0
    scaled = HAND * torch.tensor([[3.0], [0.5], [2.0], [7.0], [1.0], [0.1]])
    assert lost_boxes(scaled[None], (2, 3), normalize=True)[0].box == (2, 0, 3, 2)


def test_with_nothing_left_the_box_is_the_seed_alone():
    """Normalised features with bias -1: no affinity is positive, not even the seed's own."""
    (answer,) = lost_boxes(HAND[None], (2, 3), normalize=True, bias=-1.0)
    assert answer.seed_only and answer.box == (0, 0, 1, 1)


def test_settings_validate_and_the_presets_say_what_the_paper_ran():
    assert LOST_PRESETS["lost"] == LostSettings("keys", (-1,), False, (0.0,))
    paper = LOST_PRESETS["paper-dinov2"]
    assert (paper.features, paper.layers, paper.normalize) == ("keys", (-4, -3, -2, -1), True)
    assert LOST_PRESETS["paper-openclip"].features == "values"
    assert PAPER_BIASES[0] == -1.0 and PAPER_BIASES[-1] == 0.0 and len(PAPER_BIASES) == 11
    assert paper.resolved_layers(12) == (8, 9, 10, 11) and paper.sweeps
    assert "best of layers" in paper.describe() and "best bias in [-1, 0]" in paper.describe()
    for bad in (dict(features="attention"), dict(layers=()), dict(layers=(1.5,)), dict(biases=(float("nan"),)),
                dict(potential_seeds=0)):
        with pytest.raises(InvalidArgumentError):
            LostSettings(**bad)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        LostSettings(layers=(-13,)).resolved_layers(12)
    with pytest.raises(InvalidArgumentError, match=r"\[B, 6, D\]"):
        lost_boxes(HAND, (2, 3))
