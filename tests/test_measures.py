"""What the library measures (test_time_registers.measures), by hand on a layout with every kind of token."""

import torch

from test_time_registers import TokenLayout
from test_time_registers import measures

# [CLS][2 trained registers][6 patches][1 test-time register]
LAYOUT = TokenLayout(num_cls=1, num_trained_registers=2, num_test_time_registers=1)


def test_norms_are_taken_in_float32_for_each_kind_of_token():
    tokens = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    norms = tokens.float().norm(dim=-1)                                     # [B, L]
    assert measures.token_norms(tokens).dtype == torch.float32
    torch.testing.assert_close(measures.patch_norms(tokens, LAYOUT), norms[:, 3:9])
    torch.testing.assert_close(measures.register_norms(tokens, LAYOUT), norms[:, 9:])
    torch.testing.assert_close(measures.register_norms(tokens, LAYOUT, trained=True), norms[:, 1:3])
    torch.testing.assert_close(measures.cls_norms(tokens, LAYOUT), norms[:, 0])
    assert measures.register_norms(tokens, TokenLayout()).shape == (2, 0)   # none: an empty last axis


def test_the_outlier_ratio_is_the_largest_patch_norm_over_the_median():
    norms = torch.tensor([[1.0, 2.0, 3.0, 30.0, 2.0], [4.0, 4.0, 4.0, 4.0, 4.0]])
    torch.testing.assert_close(measures.max_over_median(norms), torch.tensor([15.0, 1.0]))


def test_the_cls_row_and_its_patch_part():
    attention = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(1)).softmax(dim=-1)   # [B, H, L, L]
    torch.testing.assert_close(measures.cls_row(attention, LAYOUT), attention[:, :, 0])
    torch.testing.assert_close(measures.cls_patch_attention(attention, LAYOUT), attention[:, :, 0, 3:9])
    stacked = torch.stack([attention, attention], dim=1)                    # any leading axes: [B, layers, H, L, L]
    assert measures.cls_patch_attention(stacked, LAYOUT).shape == (2, 2, 3, 6)
