"""read_seed_checkpoint on bad files (one clear error each, naming the file and the key), the
`trusted` switch for pickles that are not weights-only, and save_step's pruning options."""

import fractions

import pytest
import torch

from wmtp_fn.adapters.seeds_io import read_seed_checkpoint
from wmtp_fn.checkpoint import latest, read_checkpoint, save_step

LORA = {"model.layers.0.self_attn.q_proj.lora_A": torch.ones(2, 64),
        "model.layers.0.self_attn.q_proj.lora_B": torch.ones(64, 2)}
CONFIG = {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"]}


def write(tmp_path, obj, name="ck.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2], "expected a dict checkpoint, got list"),
        ({"checkpoint_type": "full"}, "legacy 'full' checkpoint without 'backbone_state_dict' (keys: ['checkpoint_type'])"),
        ({"epoch": 1.0}, "legacy 'full' checkpoint without 'backbone_state_dict' (keys: ['epoch'])"),
        ({"checkpoint_type": "hf_lora", "lora_config": CONFIG}, "hf_lora checkpoint is missing 'lora_state_dict'"),
        ({"checkpoint_type": "hf_lora", "lora_state_dict": LORA}, "hf_lora checkpoint is missing 'lora_config'"),
        ({"checkpoint_type": "hf_lora", "lora_state_dict": LORA, "lora_config": {"rank": 2, "dropout": 0.1}},
         "lora_config is missing ['alpha', 'target_modules']; it has ['dropout', 'rank']"),
        ({"checkpoint_type": "sharded"}, "checkpoint_type 'sharded' is not supported; expected 'hf_lora' or 'full'"),
    ],
)
def test_malformed_checkpoints_name_the_file_and_the_key(tmp_path, obj, message):
    path = write(tmp_path, obj)
    with pytest.raises(ValueError) as info:
        read_seed_checkpoint(path)
    assert str(info.value) == f"{path}: {message}"


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_seed_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot read as a weights-only torch checkpoint \("):
        read_seed_checkpoint(tmp_path / "junk.pt")


def test_arbitrary_pickles_need_trusted(tmp_path):
    obj = {"checkpoint_type": "hf_lora", "lora_state_dict": LORA, "lora_config": CONFIG,
           "epoch": fractions.Fraction(1, 3)}
    path = write(tmp_path, obj)
    with pytest.raises(ValueError) as info:
        read_seed_checkpoint(path)
    assert "cannot read as a weights-only torch checkpoint" in str(info.value)
    assert str(info.value).endswith("if you trust this file, pass trusted=True")
    ck = read_seed_checkpoint(path, trusted=True)
    assert ck.meta["epoch"] == fractions.Fraction(1, 3)
    assert ck.spec.rank == 2 and ck.spec.alpha == 4.0 and ck.spec.targets == ("q_proj",)
    assert torch.equal(ck.adapter["model", "layers", "0", "self_attn", "q_proj", "lora_B"], torch.ones(64, 2))


def test_hf_lora_keys_naming_no_module_are_an_error(tmp_path, base):
    bad = {"decoder.blocks.0.q_proj.lora_A": torch.ones(2, 64), "decoder.blocks.0.q_proj.lora_B": torch.ones(64, 2)}
    path = write(tmp_path, {"checkpoint_type": "hf_lora", "lora_state_dict": bad, "lora_config": CONFIG})
    with pytest.raises(ValueError, match=r"hf_lora key path 'decoder\.blocks\.0\.q_proj' names no module of LlamaForCausalLM"):
        read_seed_checkpoint(path, base)


def save_steps(root, steps, **kw):
    for step in steps:
        save_step(root, step, {"params": {"x": torch.full((2,), float(step))}}, {"step": step}, **kw)


def names(root):
    return sorted(p.name for p in root.glob("step_*"))


def test_save_step_keep_none_keeps_every_step(tmp_path):
    save_steps(tmp_path, range(5), keep=None)
    assert names(tmp_path) == [f"step_{s:08d}" for s in range(5)]
    assert latest(tmp_path).name == "step_00000004"


def test_save_step_protect_exempts_named_checkpoints_from_pruning(tmp_path):
    best = {"step_00000001"}
    save_steps(tmp_path, range(6), keep=2, protect=lambda name: name in best)
    assert names(tmp_path) == ["step_00000001", "step_00000004", "step_00000005"]
    tensors, meta = read_checkpoint(tmp_path / "step_00000001")
    assert meta["step"] == 1 and torch.equal(tensors["params"]["x"], torch.full((2,), 1.0))
    # protection is decided at each save: once no longer protected, the old step goes
    best.clear()
    save_steps(tmp_path, [6], keep=2, protect=lambda name: name in best)
    assert names(tmp_path) == ["step_00000005", "step_00000006"]
    assert latest(tmp_path).name == "step_00000006"


def test_save_step_keep_one_keeps_only_the_newest(tmp_path):
    save_steps(tmp_path, [3, 4, 10], keep=1)
    assert names(tmp_path) == ["step_00000010"]
    assert latest(tmp_path).name == "step_00000010"


def test_save_step_never_prunes_the_checkpoint_latest_points_to(tmp_path):
    save_steps(tmp_path, [3, 10, 7], keep=1)
    tensors, meta = read_checkpoint(latest(tmp_path))
    assert meta["step"] == 7 and torch.equal(tensors["params"]["x"], torch.full((2,), 7.0))
