# %% [markdown]
# # Rho-1 selection: which tokens does each head train on?
#
# Rho-1 trains each MTP head only on the tokens whose loss most exceeds a reference model's
# (`wmtp_fn.losses.rho1`). This notebook builds the pieces of one selection by hand on one
# batch: a reference adapter (a short ref_tuning run) bound on the Llama, the policy (the MTP
# base made from that Llama, heads as initialised), the per-head excess loss, and the exact
# selection `select_exact` for k ∈ {0.3, 0.7, 1.0}. It plots the selected tokens per head,
# the excess distributions with their thresholds, and the selected ratio against k, and checks
# that exactly ⌈k·N⌉ tokens are selected per head, all of them at least as "excess" as any
# token left out.
#
# CPU, embedded tiny Llama, seconds. `BASE_PATH` switches to a real Llama directory.

# %%
BASE_PATH = ""  # "" = the embedded tiny Llama; else a HuggingFace Llama directory
N_FUTURE = 3  # MTP heads
RATIOS = (0.3, 0.7, 1.0)  # the k shown token by token
OUT = "runs/rho1_selection"
MODE = "signed"  # excess: "signed" (policy − ref), "absolute", "difficult" (ref only)

# %%
import math
from fractions import Fraction
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import wmtp_fn
from wmtp_fn.adapters import apply
from wmtp_fn.config import apply_override, load_config
from wmtp_fn.data.stream import encoded_batches, record_sets
from wmtp_fn.formats import read_adapter
from wmtp_fn.losses.mtp import mtp_token_nll
from wmtp_fn.losses.ntp import IGNORE_INDEX, shift_targets
from wmtp_fn.losses.rho1 import align_reference_nll, excess_loss, select_exact, select_quantile
from wmtp_fn.models.base import open_base
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.models.prepare import prepare
from wmtp_fn.pipelines.runner import load_tokenizer
from wmtp_fn.run import run_config

torch.set_num_threads(1)
EXPERIMENTS = Path(wmtp_fn.__file__).resolve().parents[1] / "experiments"

# %% [markdown]
# ## A reference adapter and one batch

# %%
TINY = {"base.tiny_hidden_size": "64", "base.tiny_layers": "1", "data.n_samples": "32",
        "data.val_n_samples": "4", "train.batch_size": "4", "train.micro_batch_size": "4",
        "lora.rank": "8", "train.log_every": "5", "train.eval_every": "0", "export.hf_lora": "false"}
cfg = load_config(EXPERIMENTS / "ref_tuning.py")
for key, text in {"base.path": BASE_PATH, "train.steps": "10", "out_dir": f"{OUT}/reference", "device": "cpu",
                  "dtype": "float32", **({} if BASE_PATH else TINY)}.items():
    apply_override(cfg, key, text)
ref_run = run_config(cfg)

tokenizer = load_tokenizer(cfg.data, BASE_PATH)
_, val_set = record_sets(cfg.data, cfg.seed)
batches, _ = encoded_batches(val_set, range(len(val_set)), tokenizer, cfg.data, micro_batch_size=4)
batch = batches[0]
ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
print("batch", tuple(ids.shape))

# %% [markdown]
# ## Reference and policy NLL, excess
# The policy is the MTP base made from the Llama (`mtp_from_llama`: the weights are copied, so
# it is built before the Llama gets its LoRA slots). The reference is a next-token model: its
# loss on head k's target at t is its loss at position t + k − 1 (`align_reference_nll`).

# %%
llama = open_base(BASE_PATH or ref_run.out_dir / "base", dtype=torch.float32)
policy = mtp_from_llama(llama.module, N_FUTURE).eval()
prepare(llama, targets=tuple(cfg.lora.targets))
reference, spec = read_adapter(ref_run.out_dir, llama)

with torch.no_grad():
    ref_logits = apply(llama.module, reference, spec, input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    targets = shift_targets(labels)  # [B, T]
    ref_nll = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(targets)  # [B, T], 0 where no target
    policy_nll, valid = mtp_token_nll(policy(ids, mask), labels, mask)  # [B, T, H] each
excess = excess_loss(policy_nll, align_reference_nll(ref_nll, N_FUTURE), MODE)  # [B, T, H]
n_valid = valid.sum(dim=(0, 1))
print("valid tokens per head", n_valid.tolist())

# %% [markdown]
# ## Selection for each k
# `select_exact` over one micro-batch (the micro-batch scope): per head exactly ⌈k·N⌉ tokens,
# the highest excess first, ties by flat position.

# %%
selections = {k: select_exact([excess], [valid], k) for k in RATIOS}
for k, ((w,), threshold) in selections.items():
    print(f"k={k}: selected {w.sum(dim=(0, 1)).long().tolist()} of {n_valid.tolist()}, "
          f"thresholds {[round(x, 3) for x in threshold.tolist()]}")

# %% [markdown]
# Selected tokens of the first record, per head (rows) and response position (columns): dark =
# selected, grey = not selected, white = no target for that head (the prompt, padding, the end).

# %%
row = 0
cols = valid[row].any(dim=-1).nonzero().flatten()  # source positions with a target for some head
fig, axes = plt.subplots(len(RATIOS), 1, figsize=(10, 1.2 + 0.9 * len(RATIOS)), squeeze=False)
for ax, (k, ((w,), _)) in zip(axes[:, 0], selections.items()):
    shown = torch.where(valid[row], 0.4 + 0.6 * w[row], 0.0)[cols].T  # [H, positions]
    ax.imshow(shown.numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(N_FUTURE), [f"head {h + 1}" for h in range(N_FUTURE)])
    ax.set_title(f"k = {k}", fontsize=9)
axes[-1, 0].set_xlabel("response position (source-indexed)")
fig.tight_layout()
Path(OUT).mkdir(parents=True, exist_ok=True)
fig.savefig(Path(OUT) / "selected_tokens.png", dpi=100)
plt.show()

# %% [markdown]
# Excess-loss distribution per head, with the k = 0.7 threshold; and the selected ratio against k
# for the exact rule and the seeds' quantile rule (`select_quantile`: `excess ≥ quantile(1 − k)`,
# which selects the maximum even at k = 0).

# %%
grid = [i / 20 for i in range(21)]
ratios = torch.stack([select_exact([excess], [valid], k)[0][0].sum(dim=(0, 1)) / n_valid for k in grid])  # [K, H]
seeds_rule = torch.stack([select_quantile(excess, valid, k)[0].sum(dim=(0, 1)) / n_valid for k in grid])  # [K, H]
(w07,), threshold07 = select_exact([excess], [valid], 0.7)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
for h in range(N_FUTURE):
    ax1.hist(excess[..., h][valid[..., h]].numpy(), bins=30, alpha=0.5, color=f"C{h}", label=f"head {h + 1}")
    ax1.axvline(threshold07[h].item(), color=f"C{h}", linestyle="--")
    ax2.plot(grid, ratios[:, h].numpy(), marker=".", color=f"C{h}", label=f"head {h + 1} exact")
    ax2.plot(grid, seeds_rule[:, h].numpy(), linestyle="--", color=f"C{h}", alpha=0.6, label=f"head {h + 1} quantile")
ax1.set_xlabel(f"excess loss ({MODE}); dashed: k = 0.7 threshold")
ax1.legend()
ax2.plot(grid, grid, color="grey", linestyle=":", label="k")
ax2.set_xlabel("k")
ax2.set_ylabel("selected / valid")
ax2.legend()
fig.tight_layout()
fig.savefig(Path(OUT) / "excess_and_ratio.png", dpi=100)
plt.show()

# %% [markdown]
# ## Checks
# Per head exactly ⌈k·N⌉ selected (counted here in exact fractions), only valid tokens, and the
# selection is a top set: no token left out has a higher excess than a selected one.

# %%
checked = {**selections, **{k: select_exact([excess], [valid], k) for k in grid}}
for k, ((w,), _) in checked.items():
    for h in range(N_FUTURE):
        n = int(n_valid[h])
        chosen, left = w[..., h].bool(), valid[..., h] & ~w[..., h].bool()
        assert int(chosen.sum()) == math.ceil(Fraction(str(k)) * n), (k, h)
        assert not (chosen & ~valid[..., h]).any(), (k, h)
        if chosen.any() and left.any():
            assert excess[..., h][chosen].min() >= excess[..., h][left].max(), (k, h)
assert (selections[1.0][0][0].bool() == valid).all(), "k = 1 selects every valid token"
print("checks passed")
