"""PEFT directories, field by field: what `export_peft` writes against what PEFT's own
`save_pretrained` writes for the same adapter, and how `import_peft` reads the variants of
PEFT's format (`adapter_model.bin`, a regex or missing `target_modules`, an int
`layers_to_transform`, files of older releases without `use_rslora` / `use_dora`), with one
clear error per unsupported or broken file."""

import fractions
import json
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.adapters.helpers import randomize, randomize_peft
from wmtp_fn.adapters import AdapterSpec, export_peft, import_peft, init, to_flat
from wmtp_fn.models.base import load_base

TARGETS = ("q_proj", "v_proj")


def peft_saved(tiny_dir, out, *, safe=True, **cfg):
    """A directory written by PEFT's own `save_pretrained` on a fresh load of the tiny base
    (B random, as after training)."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_dir), LoraConfig(**cfg))
    randomize_peft(model)
    model.save_pretrained(out, safe_serialization=safe)
    return out


def read_config(d):
    return json.loads((d / "adapter_config.json").read_text())


def write_config(d, cfg):
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_every_config_field_we_write_is_what_peft_writes(tiny_dir, base, tmp_path, variant):
    """Our `adapter_config.json` against PEFT's for the same settings (layers, dropout, task and
    base path set to non-defaults, so a field PEFT would read under another name or not at all
    shows): every key we write is one PEFT writes, with PEFT's value; the weights file carries
    PEFT's safetensors metadata."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=list(TARGETS), layers_to_transform=[1],
               task_type="CAUSAL_LM", **variant)
    theirs_dir = peft_saved(tiny_dir, tmp_path / "peft", **cfg)
    theirs = read_config(theirs_dir)
    spec = AdapterSpec(rank=4, alpha=8.0, dropout=0.05, targets=TARGETS, layers=(1,), **variant)
    adapter, spec = init(base, spec, seed=0)
    ours_dir = export_peft(adapter, spec, tmp_path / "ours", base_model_name_or_path=theirs["base_model_name_or_path"])
    ours = read_config(ours_dir)

    assert theirs["base_model_name_or_path"]  # PEFT records the base's path: a real comparison
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for key, value in ours.items():
        if key == "target_modules":  # a set in PEFT, written in any order
            assert sorted(value) == sorted(theirs[key])
        else:
            assert value == theirs[key], key
    with safe_open(str(ours_dir / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(theirs_dir / "adapter_model.safetensors"), "pt") as g:
        assert f.metadata() == g.metadata() == {"format": "pt"}


def test_export_creates_missing_parent_directories(base, tmp_path):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    out = export_peft(randomize(adapter, seed=1), spec, tmp_path / "a" / "b" / "peft")
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == {f"base_model.model.{k}.weight" for k in to_flat(adapter)}


def test_adapter_model_bin_reads_as_the_safetensors_file(tiny_dir, base, tmp_path):
    """PEFT's pickled weights file (`safe_serialization=False`) gives the same adapter."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    bin_dir = peft_saved(tiny_dir, tmp_path / "bin", safe=False, **cfg)
    assert not (bin_dir / "adapter_model.safetensors").exists() and (bin_dir / "adapter_model.bin").is_file()
    st_dir = peft_saved(tiny_dir, tmp_path / "st", **cfg)
    a, spec_a = import_peft(bin_dir, base)
    b, spec_b = import_peft(st_dir, base)
    assert spec_a == spec_b
    assert to_flat(a).keys() == to_flat(b).keys()
    for k, v in to_flat(b).items():
        assert torch.equal(to_flat(a)[k], v), k


@pytest.mark.parametrize("torch_default", ["weights_only", "pickle"])
def test_adapter_model_bin_with_arbitrary_pickles_is_refused(base, tmp_path, monkeypatch, torch_default):
    """Read weights-only whatever torch's default (False before torch 2.6; the environment
    variable restores that default where weights_only is not passed)."""
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    (d / "adapter_model.safetensors").unlink()
    tensors[next(iter(tensors))] = fractions.Fraction(1, 3)
    torch.save(tensors, d / "adapter_model.bin")
    if torch_default == "pickle":
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        import_peft(d)


def test_a_directory_without_weights_names_both_files(base, tmp_path):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        import_peft(d)
    assert str(info.value) == f"{d}: neither adapter_model.safetensors nor adapter_model.bin"


def test_a_tensor_that_is_no_lora_weight_is_named(base, tmp_path):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A"
    save_file({**tensors, key: torch.zeros(2, 2)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as info:
        import_peft(d)
    assert str(info.value) == (f"{d}: tensor {key!r} is not a LoRA A/B/magnitude weight of a linear; "
                               "only plain LoRA/DoRA adapters of linear layers are supported")


def test_another_peft_type_is_named(base, tmp_path):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    write_config(d, {**read_config(d), "peft_type": "IA3"})
    with pytest.raises(ValueError) as info:
        import_peft(d)
    assert str(info.value) == f"{d / 'adapter_config.json'}: peft_type is 'IA3'; only 'LORA' adapters are supported"


@pytest.mark.parametrize("field, value", [
    ("bias", "all"), ("fan_in_fan_out", True), ("lora_bias", True), ("use_qalora", True),
    ("modules_to_save", ["lm_head"]), ("layer_replication", [[0, 1]]), ("target_parameters", ["mlp.experts"]),
    ("alpha_pattern", {"q_proj": 4}),
])
def test_each_option_that_changes_the_math_is_refused(base, tmp_path, field, value):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    write_config(d, {**read_config(d), field: value})
    with pytest.raises(ValueError, match=rf"field {field!r} = .* is not supported \(expected "):
        import_peft(d, base)


@pytest.mark.parametrize("field, value", [("modules_to_save", []), ("rank_pattern", None), ("lora_bias", None)])
def test_empty_values_of_those_options_are_their_defaults(base, tmp_path, field, value):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    write_config(d, {**read_config(d), field: value})
    assert import_peft(d, base)[1] == spec


def test_weights_missing_for_a_configured_target_are_refused(base, tmp_path):
    """`target_modules` is what PEFT adapted; a file without v_proj's weights is incomplete, not
    a q_proj-only adapter."""
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter is missing 4 key\(s\) .* first: 'model\.layers\.0\.self_attn\.v_proj\.lora_A'"):
        import_peft(d, base)


@pytest.mark.parametrize("target_modules", [r".*\.(q_proj|gate_proj)", None, "absent"])
def test_targets_come_from_the_tensors_for_a_regex_or_no_list(base, tmp_path, target_modules):
    """PEFT accepts a regex (a string) for `target_modules`; then, or when it is missing, the
    weights say which linears are adapted (here not the default targets)."""
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=("q_proj", "gate_proj")), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    cfg = read_config(d)
    if target_modules == "absent":
        del cfg["target_modules"]
    else:
        cfg["target_modules"] = target_modules
    write_config(d, cfg)
    got, got_spec = import_peft(d, base)
    assert got_spec.targets == ("q_proj", "gate_proj")
    assert to_flat(got).keys() == to_flat(adapter).keys()


def test_an_int_layers_to_transform_is_one_layer(base, tmp_path):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS, layers=(1,)), seed=0)
    d = export_peft(adapter, spec, tmp_path / "peft")
    write_config(d, {**read_config(d), "layers_to_transform": 1})
    assert import_peft(d, base)[1].layers == (1,)


def test_dropout_is_read_and_a_null_one_is_zero(tiny_dir, base, tmp_path):
    d = peft_saved(tiny_dir, tmp_path / "peft", r=4, lora_alpha=8, lora_dropout=0.05, target_modules=list(TARGETS))
    assert import_peft(d, base)[1].dropout == 0.05
    write_config(d, {**read_config(d), "lora_dropout": None})
    assert import_peft(d, base)[1].dropout == 0.0


def test_a_config_without_rslora_and_dora_fields_is_plain_lora(tiny_dir, base, tmp_path):
    """Older PEFT releases wrote neither `use_rslora` nor `use_dora`."""
    d = peft_saved(tiny_dir, tmp_path / "peft", r=4, lora_alpha=8, target_modules=list(TARGETS))
    cfg = read_config(d)
    del cfg["use_rslora"], cfg["use_dora"]
    write_config(d, cfg)
    spec = import_peft(d, base)[1]
    assert (spec.use_rslora, spec.use_dora, spec.variant) == (False, False, "lora")
