"""Loss edges the parity tests do not reach: a custom ignore_index end to end, the mean over a
single target, each shape/dtype message exactly, a vocabulary of one, and that chunking really
bounds the work (one matmul per chunk, no tensor larger than chunk·V on every backward path)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.losses.test_losses_cross_entropy import MaxNumel
from wmtp_fn.losses.cross_entropy import linear_cross_entropy
from wmtp_fn.losses.ntp import ntp_count, ntp_loss, ntp_sums, ntp_sums_from_hidden


def nll_by_hand(logits, labels, ignore):
    """Σ over t of −log softmax(logits[b, t])[labels[b, t+1]] for labels != ignore, float64 loop."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != ignore:
                total -= torch.log_softmax(logits[b, t].double(), dim=0)[y].item()
                count += 1
    return total, count


def test_custom_ignore_index_on_both_paths():
    g = torch.Generator().manual_seed(0)
    hidden, w = torch.randn(2, 6, 5, generator=g), torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 7, (2, 6), generator=g)
    labels[0, 2] = labels[1, 4] = labels[1, 5] = -1
    want, n = nll_by_hand(hidden @ w.T, labels, ignore=-1)
    assert n == 2 * 5 - 3
    s, c = ntp_sums(hidden @ w.T, labels, ignore_index=-1)
    s2, c2 = ntp_sums_from_hidden(hidden, w, labels, ignore_index=-1, chunk_size=4)
    assert int(c) == int(c2) == n
    assert s.item() == pytest.approx(want, rel=1e-6) and s2.item() == pytest.approx(want, rel=1e-6)
    assert ntp_loss(hidden @ w.T, labels, ignore_index=-1).item() == pytest.approx(want / n, rel=1e-6)
    assert int(ntp_count({"labels": labels}, ignore_index=-1)) == n


def test_mean_over_a_single_target():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])
    # one target: position 0 predicts class 1; −log(e² / (e + e² + e^0.5))
    want = -(2.0 - torch.logsumexp(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 0)).item()
    assert ntp_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_ntp_shape_messages():
    with pytest.raises(ValueError) as info:
        ntp_sums(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    assert str(info.value) == "ntp_sums expects logits [B, T, V], labels [B, T]; got (2, 5, 3), (2, 4)"
    with pytest.raises(ValueError) as info:
        ntp_sums(torch.zeros(10, 3), torch.zeros(2, 5, dtype=torch.long))
    assert str(info.value) == "ntp_sums expects logits [B, T, V], labels [B, T]; got (10, 3), (2, 5)"
    with pytest.raises(ValueError) as info:
        ntp_sums_from_hidden(torch.zeros(2, 5, 3), torch.zeros(4, 3), torch.zeros(2, 6, dtype=torch.long))
    assert str(info.value) == (
        "ntp_sums_from_hidden expects hidden [B, T, d], labels [B, T]; got (2, 5, 3), (2, 6)")


@pytest.mark.parametrize(
    "h, w, t, message",
    [
        ((3, 4, 2), (5, 2), (3,), "expects h [N, d], weight [V, d], targets [N]; got (3, 4, 2), (5, 2), (3,)"),
        ((3, 2), (5,), (3,), "expects h [N, d], weight [V, d], targets [N]; got (3, 2), (5,), (3,)"),
        ((3, 2), (5, 2), (3, 1), "expects h [N, d], weight [V, d], targets [N]; got (3, 2), (5, 2), (3, 1)"),
        ((3, 2), (5, 4), (3,), "shape mismatch: h (3, 2), weight (5, 4), targets (3,)"),
    ],
)
def test_cross_entropy_shape_messages(h, w, t, message):
    with pytest.raises(ValueError) as info:
        linear_cross_entropy(torch.zeros(h), torch.zeros(w), torch.zeros(t, dtype=torch.long))
    assert str(info.value) == f"linear_cross_entropy {message}"


def test_cross_entropy_type_messages():
    h, w, t = torch.zeros(3, 2), torch.zeros(5, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError) as info:
        linear_cross_entropy(h, w.double(), t)
    assert str(info.value) == (
        "linear_cross_entropy: h is torch.float32 but weight is torch.float64; cast one explicitly "
        "(the logits are computed in this common dtype)")
    for bad in (True, 2.0, -1):
        with pytest.raises(ValueError) as info:
            linear_cross_entropy(h, w, t, chunk_size=bad)
        assert str(info.value) == f"chunk_size must be a positive int, got {bad!r}"


@pytest.mark.parametrize("mode", ["no_grad", "h_grad", "h_and_w_grad"])
def test_a_vocabulary_of_one(mode):
    """With V = 1 every valid NLL is log 1 = 0, and ignored rows must not index class 1."""
    h = torch.randn(4, 3).requires_grad_(mode != "no_grad")
    w = torch.randn(1, 3).requires_grad_(mode == "h_and_w_grad")
    nll = linear_cross_entropy(h, w, torch.tensor([0, -100, 0, -100]), chunk_size=3)
    assert torch.equal(nll, torch.zeros(4))


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.mm += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, per_chunk", [("no_grad", 1), ("h_grad", 2), ("h_and_w_grad", 1)])
def test_one_pass_of_matmuls_per_chunk(mode, per_chunk):
    """The forward does `per_chunk` matmuls for each of the ⌈N / chunk⌉ chunks, no more
    (gradient in forward: logits and ∂h; otherwise the logits only)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 8, generator=g).requires_grad_(mode != "no_grad")
    w = torch.randn(20, 8, generator=g).requires_grad_(mode == "h_and_w_grad")
    t = torch.randint(0, 20, (64,), generator=g)
    with OpCount() as ops:
        linear_cross_entropy(h, w, t, chunk_size=16)
    assert ops.mm == 4 * per_chunk


@pytest.mark.parametrize("mode", ["no_grad", "h_and_w_grad"])
def test_recompute_path_never_materialises_full_logits(mode):
    n, v, chunk = 128, 64, 16
    g = torch.Generator().manual_seed(2)
    h = torch.randn(n, 8, generator=g).requires_grad_(mode != "no_grad")
    w = torch.randn(v, 8, generator=g).requires_grad_(mode == "h_and_w_grad")
    t = torch.randint(0, v, (n,), generator=g)
    with MaxNumel() as seen:
        nll = linear_cross_entropy(h, w, t, chunk_size=chunk)
        if mode != "no_grad":
            nll.sum().backward()
    assert seen.max_numel <= max(chunk * v, v * 8) < n * v


def test_ntp_from_hidden_passes_its_chunk_size_on():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 64, 8, generator=g, requires_grad=True)
    w, labels = torch.randn(50, 8, generator=g), torch.randint(0, 50, (2, 64), generator=g)
    with MaxNumel() as seen:
        s, _ = ntp_sums_from_hidden(hidden, w, labels, chunk_size=8)
        s.backward()
    assert seen.max_numel <= max(8 * 50, hidden.numel()) < 2 * 64 * 50
