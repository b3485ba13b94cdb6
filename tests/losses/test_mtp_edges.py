"""A custom ignore_index reaches every MTP loss entry point (surviving mutants of losses.mtp):
counts by hand, and the same sums and loss as with the default marker in the same places."""

import torch

from wmtp_fn.losses.mtp import head_ce_sums, mtp_count, mtp_loss, mtp_sums

# labels (5, −7, 2, 3, 1), −7 the ignored marker. Head 1 predicts labels[t+1]: (−7, 2, 3, 1, ·):
# 3 valid; head 2 predicts labels[t+2]: (2, 3, 1, ·, ·): 3 valid.
CUSTOM = torch.tensor([[5, -7, 2, 3, 1]])
DEFAULT = torch.tensor([[5, -100, 2, 3, 1]])


def test_mtp_count_with_a_custom_ignore_index_by_hand():
    assert mtp_count({"labels": CUSTOM}, n_future=2, ignore_index=-7).tolist() == [3, 3]


def test_sums_and_loss_with_a_custom_ignore_index_equal_the_default_markers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 2, 6, generator=g)
    weights = torch.rand(1, 5, generator=g)
    for a, b in zip(mtp_sums(logits, CUSTOM, weights=weights, ignore_index=-7), mtp_sums(logits, DEFAULT, weights=weights)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(mtp_loss(logits, CUSTOM, ignore_index=-7), mtp_loss(logits, DEFAULT), rtol=0, atol=0)
    hidden, unembedding = torch.randn(1, 5, 4, generator=g), torch.randn(6, 4, generator=g)
    for a, b in zip(head_ce_sums(hidden, unembedding, CUSTOM, 1, weights=weights, ignore_index=-7),
                    head_ce_sums(hidden, unembedding, DEFAULT, 1, weights=weights)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
