"""A custom ignore_index reaches every MTP loss entry point (surviving mutants of losses.mtp):
counts by hand, and the same sums and loss as with the default marker in the same places."""

import torch

from wmtp_fn.losses.mtp import head_ce_sums, mtp_count, mtp_loss, mtp_sums, mtp_token_nll

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


def test_shape_and_head_messages_name_the_function():
    import pytest

    from wmtp_fn.losses.mtp import head_targets, head_weights, mtp_valid

    with pytest.raises(ValueError, match=r"^mtp_token_nll expects logits \[B, T, H, V\] and labels \[B, T\]; "
                                         r"got \(1, 3, 2, 4\), \(1, 2\)$"):
        mtp_token_nll(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^head_targets: labels must be \[B, T\], got shape \(3,\)$"):
        head_targets(torch.zeros(3, dtype=torch.long), 1)
    for call, where in ((lambda k: head_targets(CUSTOM, k), "head_targets"),
                        (lambda k: mtp_valid(CUSTOM, n_future=k), r"mtp_valid \(n_future\)"),
                        (lambda k: head_weights(None, k, shape=(1, 5)), "head_weights")):
        for bad in (0, True):
            with pytest.raises(ValueError, match=rf"^{where}: head index k must be an int >= 1 \(1-based\), got {bad!r}$"):
                call(bad)
    with pytest.raises(ValueError, match=r"^MTP weights must be position weights"):
        head_weights(torch.ones(2, 5, 2), 1, shape=(1, 5))  # 3-D, but not [B, T, H]


def test_bf16_logits_and_float64_weights_give_fp32_sums():
    logits = torch.randn(1, 5, 2, 6, generator=torch.Generator().manual_seed(1))
    nll, _ = mtp_token_nll(logits.bfloat16(), DEFAULT)
    assert nll.dtype == torch.float32
    weighted, _ = mtp_sums(logits, DEFAULT, weights=torch.rand(1, 5, dtype=torch.float64))
    assert weighted.dtype == torch.float32
