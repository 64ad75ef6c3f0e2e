import pytest
import torch

from test_time_registers import TokenLayout


def test_slices_follow_the_declared_order():
    layout = TokenLayout(num_cls=1, num_trained_registers=4, num_test_time_registers=2)
    seq = torch.arange(1 + 4 + 9 + 2)
    assert seq[layout.cls()].tolist() == [0]
    assert seq[layout.trained_registers()].tolist() == [1, 2, 3, 4]
    assert seq[layout.patches(len(seq))].tolist() == list(range(5, 14))
    assert seq[layout.test_time_registers(len(seq))].tolist() == [14, 15]
    assert seq[layout.image_tokens(len(seq))].tolist() == list(range(14))
    assert layout.num_patches(len(seq)) == 9


def test_zero_test_time_registers_is_an_empty_slice_not_the_whole_sequence():
    layout = TokenLayout(num_cls=1)
    seq = torch.arange(10)
    assert seq[layout.test_time_registers(10)].numel() == 0
    assert seq[layout.patches(10)].tolist() == list(range(1, 10))


def test_mask_selects_groups():
    layout = TokenLayout(num_cls=1, num_trained_registers=1, num_test_time_registers=1)
    mask = layout.mask(5, cls=True, patches=True)
    assert mask.tolist() == [True, False, True, True, False]


def test_parts_are_the_masks_slices_in_token_order_without_empty_ones():
    tokens = torch.arange(11)
    for layout in (TokenLayout(num_cls=1, num_trained_registers=1, num_test_time_registers=1),
                   TokenLayout(num_cls=0, num_test_time_registers=2),
                   TokenLayout(num_cls=1, num_trained_registers=2, num_test_time_registers=2, registers_after_prefix=True)):
        for groups in ({"cls": True, "patches": True}, {"patches": True, "test_time_registers": True},
                       {"cls": True, "trained_registers": True, "test_time_registers": True}):
            parts = layout.parts(11, **groups)
            assert all(part.stop > part.start for part in parts)
            assert [part.start for part in parts] == sorted(part.start for part in parts)
            assert torch.cat([tokens[part] for part in parts]).tolist() == tokens[layout.mask(11, **groups)].tolist()


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError):
        TokenLayout(num_cls=-1)
    with pytest.raises(ValueError):
        TokenLayout(num_cls=1, num_test_time_registers=3).patches(2)


def test_registers_after_the_prefix_sit_before_the_patches():
    from test_time_registers import TokenLayout

    layout = TokenLayout(num_cls=1, num_trained_registers=2, num_test_time_registers=2, registers_after_prefix=True)
    seq_len = 1 + 2 + 2 + 6
    tokens = list(range(seq_len))
    assert tokens[layout.test_time_registers(seq_len)] == [3, 4]
    assert tokens[layout.patches(seq_len)] == [5, 6, 7, 8, 9, 10]
    assert layout.image_tokens(seq_len).tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert layout.mask(seq_len, test_time_registers=True).nonzero()[:, 0].tolist() == [3, 4]
    plain = layout.with_test_time_registers(0)
    assert plain.image_tokens(7) == slice(0, 7) and plain.patches(7) == slice(3, 7)
