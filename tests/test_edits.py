"""Paper-mode and legacy edits against tensors worked out by hand.

Layout: [CLS, p0, p1, p2, r0, r1]; 4 neurons, register neurons 1 and 3.
"""

import pytest
import torch

from test_time_registers import EditContext, LegacyEdit, PaperEdit, TokenLayout, legacy_edit, paper_edit
from test_time_registers.errors import InvalidArgumentError

LAYOUT = TokenLayout(num_cls=1, num_test_time_registers=2)
NEURONS = torch.tensor([1, 3])
TO_REGISTER = torch.tensor([0, 1])        # neuron 1 -> r0, neuron 3 -> r1
SCALE = torch.tensor([1.0, 2.0])

ACTS = torch.tensor([
    [[0.1, 5.0, 0.2, -1.0],   # CLS
     [0.3, 1.0, 0.4, -7.0],   # p0
     [0.5, 9.0, 0.6, 2.0],    # p1
     [0.7, 2.0, 0.8, 3.0],    # p2
     [0.0, 0.5, 0.0, 0.1],    # r0
     [0.0, 0.2, 0.0, 0.4]],   # r1
    [[1.0, 0.0, 1.0, 0.5],
     [1.0, 3.0, 1.0, 1.0],
     [1.0, 4.0, 1.0, 0.0],
     [1.0, 1.0, 1.0, -12.0],
     [0.0, 0.0, 0.0, 0.0],
     [0.0, 0.0, 0.0, 0.0]],
])


def test_paper_edit_moves_each_neurons_maximum_to_its_register_and_zeroes_everything_else():
    expected = torch.tensor([
        [[0.1, 0.0, 0.2, 0.0],
         [0.3, 0.0, 0.4, 0.0],
         [0.5, 0.0, 0.6, 0.0],
         [0.7, 0.0, 0.8, 0.0],
         [0.0, 9.0, 0.0, 0.0],     # max of neuron 1 (9.0) x scale 1
         [0.0, 0.0, 0.0, 6.0]],    # max of neuron 3 (3.0) x scale 2
        [[1.0, 0.0, 1.0, 0.0],
         [1.0, 0.0, 1.0, 0.0],
         [1.0, 0.0, 1.0, 0.0],
         [1.0, 0.0, 1.0, 0.0],
         [0.0, 4.0, 0.0, 0.0],
         [0.0, 0.0, 0.0, 2.0]],    # max of neuron 3 is 1.0, not the -12.0 of largest magnitude
    ])
    assert torch.equal(paper_edit(ACTS, NEURONS, TO_REGISTER, LAYOUT, SCALE), expected)


def test_legacy_edit_writes_one_signed_maximum_to_every_register_and_leaves_cls_alone():
    expected = torch.tensor([
        [[0.1, 5.0, 0.2, -1.0],    # CLS untouched
         [0.3, 0.0, 0.4, 0.0],
         [0.5, 0.0, 0.6, 0.0],
         [0.7, 0.0, 0.8, 0.0],
         [0.0, 9.0, 0.0, 9.0],     # largest |value| over tokens and both neurons: 9.0
         [0.0, 18.0, 0.0, 18.0]],  # x scale 2
        [[1.0, 0.0, 1.0, 0.5],
         [1.0, 0.0, 1.0, 0.0],
         [1.0, 0.0, 1.0, 0.0],
         [1.0, 0.0, 1.0, 0.0],
         [0.0, -12.0, 0.0, -12.0],  # the sign is kept
         [0.0, -24.0, 0.0, -24.0]],
    ])
    assert torch.equal(legacy_edit(ACTS, NEURONS, LAYOUT, SCALE), expected)


def test_paper_edit_mean_and_only_outliers_use_per_image_statistics_over_cls_and_patches():
    mean_edit = paper_edit(ACTS, NEURONS, TO_REGISTER, LAYOUT, SCALE, normal_values="mean")
    # image 0, neuron 1: mean of CLS and patches (5, 1, 9, 2) = 4.25 everywhere but its register
    torch.testing.assert_close(mean_edit[0, [0, 1, 2, 3, 5], 1], torch.full((5,), 4.25))
    assert mean_edit[0, 4, 1] == 9.0

    capped = paper_edit(ACTS, NEURONS, TO_REGISTER, LAYOUT, SCALE, normal_values="only_outliers")
    # mean 4.25, unbiased std 3.594: only 9.0 is above mean + std and becomes 4.25
    torch.testing.assert_close(capped[0, :4, 1], torch.tensor([5.0, 1.0, 4.25, 2.0]))
    assert capped[0, 5, 1] == pytest.approx(0.2)    # the other register keeps its value
    assert capped[0, 4, 1] == 9.0

    same = paper_edit(ACTS, NEURONS, TO_REGISTER, LAYOUT, SCALE, normal_values="same")
    assert torch.equal(same[0, :4], ACTS[0, :4])
    assert same[0, 4, 1] == 9.0 and same[0, 5, 3] == 6.0


def test_with_no_registers_the_edit_only_zeroes_and_never_writes_the_maximum():
    layout = TokenLayout(num_cls=1)
    acts = ACTS[:, :4]
    edited = paper_edit(acts, NEURONS, torch.zeros(2, dtype=torch.long), layout, torch.zeros(0))
    assert torch.equal(edited[:, :, [1, 3]], torch.zeros(2, 4, 2))
    assert torch.equal(edited[:, :, [0, 2]], acts[:, :, [0, 2]])
    legacy = legacy_edit(acts, NEURONS, layout, torch.zeros(0))
    assert torch.equal(legacy[:, 1:, [1, 3]], torch.zeros(2, 3, 2))
    assert torch.equal(legacy[:, 0], acts[:, 0])


def test_trained_registers_keep_their_activations():
    layout = TokenLayout(num_cls=1, num_trained_registers=1, num_test_time_registers=1)
    acts = ACTS[:, :5]       # [CLS, trained register, p, p, test-time register]
    edited = paper_edit(acts, NEURONS, torch.zeros(2, dtype=torch.long), layout, torch.ones(1))
    assert torch.equal(edited[:, 1], acts[:, 1])
    assert torch.equal(edited[:, 0, [1, 3]], torch.zeros(2, 2))


def test_each_image_is_edited_as_if_it_were_alone():
    for edit in (lambda a: paper_edit(a, NEURONS, TO_REGISTER, LAYOUT, SCALE, "only_outliers"),
                 lambda a: legacy_edit(a, NEURONS, LAYOUT, SCALE, "mean")):
        together = edit(ACTS)
        alone = torch.cat([edit(ACTS[i:i + 1]) for i in range(2)])
        assert torch.equal(together, alone)


def test_the_moved_maximum_comes_from_cls_and_patches_not_from_trained_registers():
    layout = TokenLayout(num_cls=1, num_trained_registers=1, num_test_time_registers=1)
    acts = torch.tensor([[[1.0, 2.0],      # CLS
                          [50.0, 40.0],    # trained register: the largest values, which must stay where they are
                          [3.0, -1.0],     # patch
                          [7.0, -2.0],     # patch
                          [0.5, 0.5]]])    # test-time register
    edited = paper_edit(acts, torch.tensor([0, 1]), torch.tensor([0, 0]), layout, torch.ones(1))
    expected = torch.tensor([[[0.0, 0.0], [50.0, 40.0], [0.0, 0.0], [0.0, 0.0], [7.0, 2.0]]])
    assert torch.equal(edited, expected)
    legacy = legacy_edit(acts, torch.tensor([0, 1]), layout, torch.ones(1))   # the reference: over all tokens
    assert torch.equal(legacy[0, 4], torch.tensor([50.0, 50.0]))


def test_only_outliers_uses_the_unbiased_std_of_the_reference():
    layout = TokenLayout(num_cls=1, num_test_time_registers=1)
    tokens = torch.tensor([0.0, 0.0, 3.0, 3.0, 7.1, 9.0])         # CLS and 5 patches of one neuron
    acts = torch.cat([tokens, torch.zeros(1)]).reshape(1, 7, 1)
    mean = tokens.mean()
    assert mean + tokens.std(unbiased=False) < 7.1 < mean + tokens.std(unbiased=True)   # 7.1 tells them apart
    for edited in (paper_edit(acts, torch.tensor([0]), torch.tensor([0]), layout, torch.ones(1), "only_outliers"),
                   legacy_edit(acts, torch.tensor([0]), TokenLayout(num_cls=0, num_test_time_registers=1),
                               torch.ones(1), "only_outliers")):
        assert edited[0, 4, 0] == pytest.approx(7.1) and edited[0, 5, 0] == pytest.approx(float(mean))


def test_edit_objects_have_one_signature_a_readable_repr_and_edit_in_place_only_without_autograd():
    context = EditContext(layer=0, register_of_neuron=TO_REGISTER, scale=SCALE)
    assert torch.equal(PaperEdit()(ACTS.clone(), NEURONS, LAYOUT, context), paper_edit(ACTS, NEURONS, TO_REGISTER,
                                                                                        LAYOUT, SCALE))
    assert torch.equal(LegacyEdit("mean")(ACTS.clone(), NEURONS, LAYOUT, context),
                       legacy_edit(ACTS, NEURONS, LAYOUT, SCALE, "mean"))
    assert repr(PaperEdit()) == "PaperEdit(normal_values='zero', seed=0)"
    assert repr(LegacyEdit("mean")) == "LegacyEdit(normal_values='mean', seed=0)"
    with pytest.raises(InvalidArgumentError, match="normal_values must be one of"):
        PaperEdit("median")

    acts = ACTS.clone()
    with torch.no_grad():
        assert PaperEdit()(acts, NEURONS, LAYOUT, context) is acts          # no copy of the whole tensor
    tracked = ACTS.clone().requires_grad_()
    edited = PaperEdit()(tracked, NEURONS, LAYOUT, context)
    assert edited is not tracked and torch.equal(tracked, ACTS)           # autograd keeps the original
    edited.sum().backward()
    assert tracked.grad[0, 0, 0] == 1 and tracked.grad[0, 0, 1] == 0
