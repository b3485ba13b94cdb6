"""Rho-1 edges (surviving mutants of ``losses.rho1``): the alignment with one head and its
argument checks, the default mode, the dtype of the ``difficult`` excess, the ratio's type
check, and the messages in full."""

import re

import pytest
import torch

from wmtp_fn.losses.rho1 import align_reference_nll, excess_loss, select_exact, selected_count


def align_loop(ref_nll: torch.Tensor, n_future: int) -> torch.Tensor:
    """float64 loop: out[b, t, k−1] = ref_nll[b, t+k−1] where t+k−1 < T, else 0."""
    B, T = ref_nll.shape
    out = torch.zeros(B, T, n_future, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for k in range(1, n_future + 1):
                if t + k - 1 < T:
                    out[b, t, k - 1] = float(ref_nll[b, t + k - 1])
    return out


@pytest.mark.parametrize("n_future", [1, 2, 4])
def test_alignment_matches_a_loop_also_for_one_head(n_future):
    ref = torch.tensor([[0.5, 1.25, 2.0], [3.0, 4.5, 6.75]], dtype=torch.float64)
    got = align_reference_nll(ref, n_future)
    assert got.shape == (2, 3, n_future)
    assert torch.equal(got, align_loop(ref, n_future))
    if n_future == 1:
        assert torch.equal(got[..., 0], ref)  # one head: the reference NLL itself


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.0, "2"])
def test_alignment_refuses_a_head_count_that_is_not_a_positive_int(bad):
    message = f"align_reference_nll: n_future must be an int >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        align_reference_nll(torch.zeros(2, 3), bad)


def test_alignment_names_the_shape_it_got():
    message = "align_reference_nll: ref_nll must be [B, T], got shape (2, 3, 1)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        align_reference_nll(torch.zeros(2, 3, 1), 1)


def test_excess_default_mode_is_signed():
    p = torch.tensor([[[1.0, 0.25]]])
    r = torch.tensor([[[3.0, 0.0]]])
    assert excess_loss(p, r).tolist() == [[[-2.0, 0.25]]]  # p − r by hand, sign kept


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16)])
def test_difficult_excess_is_the_reference_in_the_common_dtype(dtypes):
    p_dtype, r_dtype = dtypes
    p = torch.tensor([[[1.0, 2.0]]], dtype=p_dtype)
    r = torch.tensor([[[0.5, 3.0]]], dtype=r_dtype)
    for mode in ("signed", "absolute", "difficult"):
        assert excess_loss(p, r, mode).dtype == p_dtype  # the wider of the two, in every mode
    assert excess_loss(p, r, "difficult").tolist() == [[[0.5, 3.0]]]


def test_excess_shape_message_in_full():
    message = (
        "excess_loss: policy_nll (1, 3, 2) and ref_nll (1, 3, 1) differ; "
        "align the reference with align_reference_nll first"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        excess_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, 1))


@pytest.mark.parametrize("bad", [True, False, "0.5", None, -0.25, 1.5])
def test_a_ratio_that_is_not_a_number_in_0_1_is_refused(bad):
    message = f"rho1 selection ratio must be a number in [0, 1], got {bad!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        selected_count(torch.tensor([4]), bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        select_exact([torch.zeros(1, 2, 1)], [torch.ones(1, 2, 1, dtype=torch.bool)], bad)
