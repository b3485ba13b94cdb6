"""unflatten_state's messages in full: the format it got, at most five missing and five
unexpected names, a field absent from the metadata (surviving mutants of train.state)."""

import re

import pytest

from tests.train.test_train_state import fresh
from wmtp_fn.train.state import FORMAT, flatten_state, unflatten_state


def test_format_message_names_what_it_got():
    tensors, meta = flatten_state(fresh())
    with pytest.raises(ValueError, match=rf"^unflatten_state: expected format '{re.escape(FORMAT)}', got 'other/9'$"):
        unflatten_state(tensors, {**meta, "format": "other/9"})


def test_key_mismatch_lists_five_missing_and_five_unexpected():
    tensors, meta = flatten_state(fresh())
    names = sorted(tensors)[:6]  # six missing: only the first five (sorted) are listed
    odd = {k: v for k, v in tensors.items() if k not in names}
    odd.update({f"zz{i}": tensors[names[0]] for i in range(6)})  # six unexpected
    with pytest.raises(KeyError) as err:
        unflatten_state(odd, meta)
    assert err.value.args[0] == (f"unflatten_state: tensors do not match the metadata: missing {names[:5]}, "
                                 f"unexpected {['zz0', 'zz1', 'zz2', 'zz3', 'zz4']}")


def test_a_field_absent_from_the_metadata_is_named():
    tensors, meta = flatten_state(fresh())
    with pytest.raises(KeyError) as err:
        unflatten_state(tensors, {k: v for k, v in meta.items() if k != "step"})
    assert err.value.args[0] == "unflatten_state: the metadata has no TrainState field 'step'"


def test_init_train_state_refuses_bad_seeds_and_extras_by_name():
    from tests.train.test_train_state import CFG
    from tests.train.train_toy_lm import init_params
    from wmtp_fn.train.state import init_train_state

    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match=rf"^seed must be an int >= 0, got {re.escape(repr(bad))}$"):
            init_train_state(init_params(), CFG, seed=bad)
    with pytest.raises(TypeError, match=r"^extra must be a TensorDict, got dict$"):
        init_train_state(init_params(), CFG, seed=0, extra={})


def test_flatten_state_refuses_a_field_of_another_type():
    from dataclasses import replace

    for value, kind in (("3", "str"), (True, "bool")):
        with pytest.raises(TypeError, match=rf"^flatten_state: field 'step' holds a {kind}; "
                                            r"expected a TensorDict, a tensor or an int$"):
            flatten_state(replace(fresh(), step=value))
