"""The step normalisers by hand: component_weights' fp32 result from float64 counts, and
weighted_sum (surviving mutants of losses.normalise)."""

import torch

from wmtp_fn.losses.normalise import component_weights, weighted_sum


def test_component_weights_are_fp32_for_float64_counts():
    got = component_weights(torch.tensor([2.0, 0.0, 8.0], dtype=torch.float64))
    assert got.dtype == torch.float32 and got.tolist() == [0.25, 0.0, 0.0625]  # 1 / (N_k · 2)


def test_weighted_sum_by_hand_in_fp32():
    # 2 · 0.5 + 3 · 0.25 + 7 · 0 = 1.75
    got = weighted_sum(torch.tensor([2.0, 3.0, 7.0], dtype=torch.float64), torch.tensor([0.5, 0.25, 0.0]))
    assert got.dtype == torch.float32 and got.shape == () and got.item() == 1.75
