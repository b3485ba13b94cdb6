# %% [markdown]
# # Adapters are data
#
# A LoRA adapter here is a TensorDict pytree, not a module: two adapters trained on one frozen
# base can be loaded side by side, compared on the same validation tokens, and combined with
# plain arithmetic — `(1 − α)·A + α·B` is a TensorDict expression, bound into the base by
# `wmtp_fn.adapters.apply` without touching the base's weights.
#
# This notebook trains two reference adapters A and B (ref_tuning, two seeds), loads both from
# their run directories, computes per-token validation losses, and plots the loss along the
# line from A to B (α < 0 and α > 1 extrapolate along the task vector `B − A`). The last cells
# check that α = 0 gives A's losses exactly and α = 1 gives B's.
#
# It runs on the CPU in well under a minute with the embedded tiny Llama. Set `BASE_PATH` to a
# HuggingFace Llama directory (e.g. SmolLM2) to use a real base (and raise `STEPS`).

# %%
BASE_PATH = ""  # "" = the embedded tiny Llama; else a HuggingFace Llama directory
STEPS = 10  # optimizer steps per adapter
SEEDS = (1, 2)  # adapter A's seed, adapter B's seed
OUT = "runs/adapters_are_data"  # the two run directories go under here (rerunning reuses them)
ALPHAS = [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import wmtp_fn
from wmtp_fn.adapters import apply
from wmtp_fn.config import apply_override, load_config
from wmtp_fn.data.stream import encoded_batches, record_sets
from wmtp_fn.formats import read_adapter
from wmtp_fn.losses.ntp import IGNORE_INDEX, shift_targets
from wmtp_fn.models.base import open_base
from wmtp_fn.models.prepare import prepare
from wmtp_fn.pipelines.runner import load_tokenizer
from wmtp_fn.run import run_config

torch.set_num_threads(1)
EXPERIMENTS = Path(wmtp_fn.__file__).resolve().parents[1] / "experiments"

# %% [markdown]
# ## Train A and B
# The experiment config, with the overrides a user would type after `--config.` on the command
# line. Only the seed differs: it sets the adapter init and the data order (and the validation
# split, so everything below is measured on A's validation records).

# %%
TINY = {"base.tiny_hidden_size": "64", "base.tiny_layers": "1", "data.n_samples": "32",
        "data.val_n_samples": "8", "train.batch_size": "4", "train.micro_batch_size": "4",
        "lora.rank": "8", "train.log_every": "5", "train.eval_every": "0", "export.hf_lora": "false"}


def ref_config(seed: int):
    cfg = load_config(EXPERIMENTS / "ref_tuning.py")
    overrides = {"base.path": BASE_PATH, "seed": str(seed), "train.steps": str(STEPS),
                 "out_dir": f"{OUT}/seed{seed}", "device": "cpu", "dtype": "float32",
                 **({} if BASE_PATH else TINY)}
    for key, text in overrides.items():
        apply_override(cfg, key, text)
    return cfg


configs = [ref_config(seed) for seed in SEEDS]
results = [run_config(cfg) for cfg in configs]
for r in results:
    print(r.out_dir, f"val_loss {r.first_val_loss:.4f} -> {r.final_val_loss:.4f}")

# %% [markdown]
# ## Load both adapters onto one base
# The run directory holds the base it trained on (`base/`, the embedded Llama) or names it.
# `read_adapter` checks each adapter against that base (keys, shapes, the base's fingerprint).

# %%
base = open_base(BASE_PATH or results[0].out_dir / "base", dtype=torch.float32)
prepare(base, targets=tuple(configs[0].lora.targets))
(A, spec), (B, spec_b) = (read_adapter(r.out_dir, base) for r in results)
assert spec == spec_b, "interpolation needs adapters of one spec (rank, targets)"
print(spec)
print(A)

# %% [markdown]
# ## Per-token validation losses
# The NTP loss per target token (`shift_targets`: the label of position t is token t + 1),
# padding and the prompt masked out; one flat vector over every validation record.

# %%
tokenizer = load_tokenizer(configs[0].data, BASE_PATH)
_, val_set = record_sets(configs[0].data, configs[0].seed)
val_batches, _ = encoded_batches(val_set, range(len(val_set)), tokenizer, configs[0].data,
                                 micro_batch_size=configs[0].train.micro_batch_size)


@torch.no_grad()
def token_losses(adapter) -> torch.Tensor:
    """Per-token NTP losses ``[N]`` of `adapter` on every validation target token (in order)."""
    out = []
    for batch in val_batches:
        logits = apply(base.module, adapter, spec, input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        targets = shift_targets(batch["labels"])  # [B, T]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none")  # [B*T]
        out.append(loss[targets.flatten() != IGNORE_INDEX])
    return torch.cat(out)


loss_a, loss_b = token_losses(A), token_losses(B)
print(f"{loss_a.numel()} tokens; mean loss A {loss_a.mean():.4f}, B {loss_b.mean():.4f}")
print(f"B beats A on {(loss_b < loss_a).float().mean():.0%} of the tokens")

# %% [markdown]
# ## Interpolate and extrapolate
# `(1 − α)·A + α·B` is computed leaf by leaf on the TensorDicts — the result is another adapter
# of the same spec. (Interpolating LoRA factors is not interpolating the weight deltas
# `B·A`: the delta is bilinear in the factors.)

# %%
def mix(alpha: float):
    return (1 - alpha) * A + alpha * B


curve = {alpha: token_losses(mix(alpha)) for alpha in ALPHAS}
for alpha, losses in curve.items():
    print(f"alpha {alpha:+.2f}: mean loss {losses.mean():.5f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ALPHAS, [curve[a].mean().item() for a in ALPHAS], marker="o", label="(1 − α)·A + α·B")
ax.axhline(loss_a.mean().item(), color="C1", linestyle="--", label=f"A (seed {SEEDS[0]})")
ax.axhline(loss_b.mean().item(), color="C2", linestyle=":", label=f"B (seed {SEEDS[1]})")
ax.set_xlabel("α")
ax.set_ylabel("mean validation NTP loss")
ax.legend()
fig.tight_layout()
fig.savefig(Path(OUT) / "loss_vs_alpha.png", dpi=100)
plt.show()

# %% [markdown]
# ## Checks
# α = 0 and α = 1 are A and B exactly (x·1 + y·0 = x in floating point), and the mean of A's
# per-token losses is the validation loss the run itself logged last (its own code path: the
# chunked fused cross-entropy of the training objective).

# %%
assert torch.equal(curve[0.0], loss_a), "alpha = 0 must reproduce A's per-token losses exactly"
assert torch.equal(curve[1.0], loss_b), "alpha = 1 must reproduce B's per-token losses exactly"
assert not torch.equal(loss_a, loss_b), "A and B must differ, or the curve says nothing"
torch.testing.assert_close(loss_a.mean().item(), results[0].final_val_loss, rtol=1e-4, atol=0)
print("checks passed")
