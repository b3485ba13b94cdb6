"""``train.evaluate``'s edges (surviving mutants): the empty-input message in full."""

import re

import pytest
from tensordict import TensorDict

from tests.train.test_objective_contract import PLAIN, two_head_params
from wmtp_fn.train.evaluate import evaluate


def test_no_batches_is_one_error_asking_about_the_validation_set():
    message = "evaluate: no batches (is the validation set empty?)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        evaluate(PLAIN, two_head_params(), TensorDict(), iter([]))
