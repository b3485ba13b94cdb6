"""Leaf access for TensorDict pytrees: ordered leaf keys, leaf lists, dotted names.

The optimizer and the state (de)serialisation walk a pytree's leaves in one fixed order:
the TensorDict's own depth-first insertion order, which is stable for a given tree. Keeping
that order matters for bitwise reproducibility, because a global gradient norm sums the
per-leaf norms in this order.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensordict import TensorDict
from torch import Tensor

Key = tuple[str, ...]


def leaf_keys(tree: TensorDict) -> list[Key]:
    """All leaf keys of ``tree`` as tuples, in the tree's depth-first insertion order."""
    return [
        k if isinstance(k, tuple) else (k,)
        for k in tree.keys(include_nested=True, leaves_only=True)
    ]


def leaves(tree: TensorDict, keys: Sequence[Key]) -> list[Tensor]:
    """The leaves of ``tree`` at ``keys`` (the stored tensor objects, not copies).

    Raises ``KeyError`` naming the first missing key, so a gradient or moment tree whose
    structure drifted from the parameters fails loudly instead of silently skipping leaves.
    """
    out = []
    for k in keys:
        t = tree.get(k, None)
        if t is None:
            raise KeyError(f"pytree has no leaf {'.'.join(k)!r}")
        out.append(t)
    return out


def dotted(key: Key, sep: str = ".") -> str:
    """``("lora", "model", "q_proj", "lora_A")`` -> ``"lora.model.q_proj.lora_A"``.

    Raises ``ValueError`` if a key part contains ``sep`` (the name would not round-trip).
    """
    for part in key:
        if sep in part:
            raise ValueError(f"key part {part!r} of {key!r} contains the separator {sep!r}")
    return sep.join(key)


def leaf_items(tree: TensorDict) -> tuple[list[Key], list[Tensor]]:
    """``(keys, leaves)`` in one traversal (the hot path of a step: no per-key lookups)."""
    keys, values = [], []
    for k, v in tree.items(include_nested=True, leaves_only=True):
        keys.append(k if isinstance(k, tuple) else (k,))
        values.append(v)
    return keys, values


def aligned_leaves(tree: TensorDict, keys: Sequence[Key], *, what: str = "pytree") -> list[Tensor]:
    """The leaves of ``tree`` in ``keys`` order, in one traversal when the order already agrees.

    Raises ``KeyError`` naming the first missing or unexpected leaves, so a gradient or moment
    tree whose structure drifted from the parameters fails loudly instead of skipping leaves.
    """
    own_keys, values = leaf_items(tree)
    if own_keys == list(keys):
        return values
    by_key = dict(zip(own_keys, values))
    diff = sorted(dotted(k) for k in set(by_key) ^ set(keys))
    if diff:
        raise KeyError(f"{what} and params differ in leaves {diff[:5]}")
    return [by_key[k] for k in keys]


def tree_from_leaves(keys: Sequence[Key], values: Sequence[Tensor], batch_size=()) -> TensorDict:
    """A nested TensorDict with ``values`` at ``keys`` (built in one constructor call)."""
    nested: dict = {}
    for k, v in zip(keys, values):
        node = nested
        for part in k[:-1]:
            node = node.setdefault(part, {})
        node[k[-1]] = v
    return TensorDict(nested, batch_size=batch_size)
