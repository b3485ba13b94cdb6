"""The step's metric division and gradient clipping at their edges, by hand (surviving mutants of
train.sums and train.clip)."""

import math

import pytest
import torch

from wmtp_fn.train.clip import clip_tensors_, global_norm
from wmtp_fn.train.sums import COUNT, divide, to_host


def test_divide_by_counts_of_matching_shape_and_zero_denominators_by_hand():
    sums = {"loss": torch.tensor([3.0, 4.0, 5.0]), "tokens": torch.tensor([2.0, 0.0, 0.5])}
    counts = torch.tensor([6, 0, 2], dtype=torch.int64)  # an integer count is divided in fp32
    got = divide(sums, counts, {"loss": COUNT})
    assert got["loss"].dtype == torch.float32
    assert got["loss"].tolist() == [0.5, 0.0, 2.5]  # 0 where the denominator is 0
    assert got["tokens"] is sums["tokens"]  # not named in means: left as the sum
    by_metric = divide(sums, counts, {"loss": "tokens"})
    assert by_metric["loss"].tolist() == [1.5, 0.0, 10.0]  # 5 / 0.5: a denominator below 1 divides


def test_divide_broadcasts_a_single_count_and_reshapes_a_one_element_one():
    got = divide({"acc": torch.tensor([2.0, 3.0]), "loss": torch.tensor(6.0)}, torch.tensor([4]), {"acc": COUNT, "loss": COUNT})
    assert got["acc"].tolist() == [0.5, 0.75]
    assert got["loss"].shape == () and got["loss"].item() == 1.5
    two = divide({"acc": torch.tensor([2.0, 3.0])}, torch.tensor([4.0, 1.0]), {"acc": COUNT})
    assert two["acc"].tolist() == [0.5, 3.0]


def test_divide_names_a_shape_it_cannot_divide():
    with pytest.raises(ValueError, match=r"^metric 'acc' \(3,\) cannot be divided by 'count' \(2,\)$"):
        divide({"acc": torch.zeros(3)}, torch.ones(2), {"acc": COUNT})


def test_global_norm_by_hand_and_of_one_tensor():
    assert global_norm([torch.tensor([3.0, 4.0])]).item() == 5.0
    got = global_norm([torch.tensor([1.0, 2.0]), torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([4.0], dtype=torch.bfloat16)])
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(5.0)  # sqrt(1 + 4 + 4 + 16)
    with pytest.raises(ValueError, match=r"^global_norm of an empty list$"):
        global_norm([])


def test_clip_tensors_scales_to_max_norm_by_hand_and_leaves_small_ones():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    norm = clip_tensors_([a, b], 1.0)
    assert norm.item() == 5.0  # the norm before clipping
    coef = 1.0 / (5.0 + 1e-6)
    assert a.tolist() == pytest.approx([3.0 * coef, 0.0], abs=1e-7) and b.tolist() == pytest.approx([0.0, 4.0 * coef], abs=1e-7)
    c = torch.tensor([0.3, 0.4])
    c0 = c.clone()
    assert clip_tensors_([c], 1.0).item() == pytest.approx(0.5)
    assert torch.equal(c, c0)  # below max_norm: the coefficient clamps at 1
    d = torch.tensor([30.0, 40.0])
    for off in (None, 0.0):
        assert clip_tensors_([d], off).item() == 50.0
        assert d.tolist() == [30.0, 40.0]  # None / 0: measure only
    assert math.isclose(clip_tensors_([torch.tensor([6.0, 8.0])], 5.0).item(), 10.0)


def test_to_host_names_vector_entries_and_keeps_counts_past_fp32_exact():
    big = 2**24 + 1  # not representable in fp32
    got = to_host({"loss": torch.tensor(0.5), "ce": torch.tensor([1.0, 2.0, 3.0]), "tokens": torch.tensor(big, dtype=torch.int64)})
    assert got == {"loss": 0.5, "ce/0": 1.0, "ce/1": 2.0, "ce/2": 3.0, "tokens": float(big)}
    assert list(got) == ["loss", "ce/0", "ce/1", "ce/2", "tokens"]
    assert to_host({}) == {}


def test_total_counts_messages_name_the_micro_batch_and_what_it_gave():
    from wmtp_fn.dist.comm import LOCAL
    from wmtp_fn.train.sums import total_counts

    assert total_counts(lambda mb: mb, [torch.tensor([1, 2]), torch.tensor([3, 4])], LOCAL).tolist() == [4, 6]
    with pytest.raises(ValueError, match=r"^objective.count must return a \[K\] tensor for every micro-batch; micro-batch 0 gave \(\)$"):
        total_counts(lambda mb: mb, [torch.tensor(3)], LOCAL)
    with pytest.raises(ValueError, match=r"^objective.count must return a \[K\] tensor for every micro-batch; micro-batch 0 gave int$"):
        total_counts(lambda mb: mb, [3], LOCAL)
    with pytest.raises(ValueError, match=r"micro-batch 1 gave \(3,\), micro-batch 0 \(2,\)$"):
        total_counts(lambda mb: mb, [torch.ones(2), torch.ones(3)], LOCAL)
    with pytest.raises(ValueError, match=r"micro-batch 1 gave \(1, 2\), micro-batch 0 \(2,\)$"):
        total_counts(lambda mb: mb, [torch.ones(2), torch.ones(1, 2)], LOCAL)
    with pytest.raises(ValueError, match=r"micro-batch 1 gave list, micro-batch 0 \(2,\)$"):
        total_counts(lambda mb: mb, [torch.ones(2), [1, 2]], LOCAL)


def test_check_sums_and_add_metrics_messages():
    from wmtp_fn.train.sums import add_metrics, check_sums

    with pytest.raises(ValueError, match=r"^objective.loss returned sums of shape \(3,\), objective.count counts \(2,\)$"):
        check_sums(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"^objective.loss returned sums of shape float, objective.count counts \(2,\)$"):
        check_sums(1.0, torch.zeros(2))
    with pytest.raises(ValueError, match=r"^metric 'm' must be a \[\] or \[K\] tensor or a number \(a sum\), got a tensor of shape \(2, 2\)$"):
        add_metrics({}, {"m": torch.zeros(2, 2)}, torch.device("cpu"), 0)
    with pytest.raises(ValueError, match=r"got str$"):
        add_metrics({}, {"m": "x"}, torch.device("cpu"), 0)
    with pytest.raises(ValueError, match=r"got bool$"):
        add_metrics({}, {"m": True}, torch.device("cpu"), 0)
    got = add_metrics({}, {"a": torch.tensor([1, 2], dtype=torch.int64), "b": 3}, torch.device("cpu"), 0)
    assert got["a"].dtype == torch.float32 and got["a"].tolist() == [1.0, 2.0]
    assert got["b"].dtype == torch.float32 and got["b"].item() == 3.0
    summed = add_metrics(got, {"a": torch.tensor([0.5, 0.5], dtype=torch.float64), "b": 1}, torch.device("cpu"), 1)
    assert summed["a"].dtype == torch.float32 and summed["a"].tolist() == [1.5, 2.5] and summed["b"].item() == 4.0


def test_add_metrics_messages_for_drifting_micro_batches():
    from wmtp_fn.train.sums import add_metrics

    cpu = torch.device("cpu")
    first = add_metrics({}, {"a": torch.zeros(2)}, cpu, 0)
    with pytest.raises(ValueError, match=r"^micro-batch 1 returned metrics \['b'\], micro-batch 0 \['a'\]; "
                                         r"every micro-batch must report the same sums$"):
        add_metrics(first, {"b": torch.zeros(2)}, cpu, 1)
    with pytest.raises(ValueError, match=r"^metric 'a' has shape \(3,\) in micro-batch 2, \(2,\) before$"):
        add_metrics(first, {"a": torch.zeros(3)}, cpu, 2)


def test_sum_over_ranks_keeps_vector_metrics_whole():
    from wmtp_fn.train.sums import sum_over_ranks

    class TwoIdenticalRanks:  # what an all-reduce of two ranks holding the same values gives
        rank, world_size = 0, 2
        calls = 0

        def sum_(self, t):
            self.calls += 1
            return t.mul_(2)

    comm = TwoIdenticalRanks()
    loss, metrics = sum_over_ranks(torch.tensor([1.0, 2.0]), {"ce": torch.tensor([3.0, 4.0, 5.0]), "n": torch.tensor(6.0)}, comm)
    assert comm.calls == 1  # one collective for everything
    assert loss.tolist() == [2.0, 4.0]
    assert metrics["ce"].tolist() == [6.0, 8.0, 10.0] and metrics["n"].shape == () and metrics["n"].item() == 12.0


def test_clip_by_global_norm_accepts_zero_and_names_a_negative_max_norm():
    from tensordict import TensorDict

    from wmtp_fn.train.clip import clip_by_global_norm

    grads = TensorDict({"a": torch.tensor([30.0, 40.0])}, batch_size=[])
    same, norm = clip_by_global_norm(grads, 0.0)
    assert same is grads and norm.item() == 50.0 and grads["a"].tolist() == [30.0, 40.0]
    with pytest.raises(ValueError, match=r"^max_norm must be None or >= 0, got -1\.0$"):
        clip_by_global_norm(grads, -1.0)
    _, norm = clip_by_global_norm(grads, 5.0)  # max_norm is passed on: the tree is clipped
    assert norm.item() == 50.0 and grads["a"].tolist() == pytest.approx([3.0, 4.0], abs=1e-6)
