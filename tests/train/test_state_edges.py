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
