"""Pytree helpers and the step seed at their edges (surviving mutants of train.tree and train.rng)."""

import pytest
import torch
from tensordict import TensorDict

from wmtp_fn.train.rng import step_seed
from wmtp_fn.train.tree import aligned_leaves, leaf_items, leaf_keys, leaves, tree_from_leaves


def _tree():
    return TensorDict({"top": torch.zeros(1), "a": {"b": torch.ones(2)}}, batch_size=[])


def test_top_level_leaves_are_one_element_tuples_too():
    assert leaf_keys(_tree()) == [("top",), ("a", "b")]
    keys, values = leaf_items(_tree())
    assert keys == [("top",), ("a", "b")] and [v.shape for v in values] == [(1,), (2,)]


def test_leaves_names_the_missing_leaf_dotted():
    with pytest.raises(KeyError, match=r"pytree has no leaf 'a.c'"):
        leaves(_tree(), [("top",), ("a", "c")])


def test_aligned_leaves_names_at_most_five_differences_and_the_tree():
    tree = TensorDict({f"k{i}": torch.full((1,), float(i)) for i in range(7)}, batch_size=[])
    keys = [(f"k{i}",) for i in range(7)]
    assert [v.item() for v in aligned_leaves(tree, list(reversed(keys)))] == [6, 5, 4, 3, 2, 1, 0]  # looked up
    wanted = [(f"x{i}",) for i in range(7)]
    with pytest.raises(KeyError) as e:
        aligned_leaves(tree, wanted)
    assert e.value.args[0] == "pytree and params differ in leaves ['k0', 'k1', 'k2', 'k3', 'k4']"
    with pytest.raises(KeyError) as e:
        aligned_leaves(tree, wanted, what="grads")
    assert e.value.args[0].startswith("grads and params differ in leaves")


def test_tree_from_leaves_keeps_a_batch_size():
    td = tree_from_leaves([("a", "b"), ("c",)], [torch.zeros(2, 3), torch.ones(2)], batch_size=[2])
    assert td.batch_size == torch.Size([2])
    assert td["a", "b"].shape == (2, 3) and torch.equal(td["c"], torch.ones(2))
    assert tree_from_leaves([("c",)], [torch.ones(2)]).batch_size == torch.Size([])


@pytest.mark.parametrize("args, name, got", [((-1, 0, 0), "seed", "-1"), ((0, 1.5, 0), "step", "1.5"),
                                             ((0, 0, True), "rank", "True")])
def test_step_seed_names_the_bad_argument(args, name, got):
    with pytest.raises(ValueError, match=rf"^step_seed: {name} must be an int >= 0, got {got}$"):
        step_seed(*args)
