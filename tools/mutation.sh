#!/usr/bin/env bash
# Mutation testing with mutmut over chosen modules, run locally (never in CI: too slow).
#
#   tools/mutation.sh MODULE.py... [-- TEST_PATH...]
#
#   tools/mutation.sh wmtp_fn/losses/ntp.py wmtp_fn/losses/cross_entropy.py -- tests/losses
#
# MODULE: source files to mutate (paths from the repo root). TEST_PATH: the pytest paths or node
# ids that judge them (default: tests). mutmut then runs, for each mutant, only those of the
# selected tests that reach the mutated function, stopping at the first failure.
#
# The run happens in a scratch copy of the working tree ($MUTATION_DIR, default .mutation/ in the
# repo, git-ignored), so the worktree is never touched and several module lists can be scored one
# after another. mutmut's own settings are [tool.mutmut] in pyproject.toml; this script only
# fills in only_mutate and the test selection. Environment: MUTATION_JOBS (parallel mutants,
# default 1), MUTATION_DIR.
#
# Output: per module `killed/total` and each surviving mutant as a diff; inspect one later with
# `cd .mutation && mutmut show NAME`. Needs mutmut: pip install -e ".[mutation]".
set -euo pipefail

root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
cd "$root"

modules=()
tests=()
seen_sep=0
for arg in "$@"; do
    if [[ "$arg" == "--" ]]; then seen_sep=1; continue; fi
    if (( seen_sep )); then tests+=("$arg"); else modules+=("$arg"); fi
done
if (( ${#modules[@]} == 0 )); then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
(( ${#tests[@]} )) || tests=(tests)
for m in "${modules[@]}"; do
    [[ -f "$m" && "$m" == *.py ]] || { echo "mutation.sh: $m is not a .py file under $root" >&2; exit 2; }
done
for t in "${tests[@]}"; do
    [[ -e "${t%%::*}" ]] || { echo "mutation.sh: test path ${t%%::*} does not exist" >&2; exit 2; }
done

python="${PYTHON:-$(command -v python)}"
[[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
mutmut="$(dirname "$python")/mutmut"
[[ -x "$mutmut" ]] || mutmut="$(command -v mutmut)" || { echo "mutation.sh: mutmut not found; pip install -e '.[mutation]'" >&2; exit 2; }

scratch="${MUTATION_DIR:-$root/.mutation}"
rm -rf "$scratch"
mkdir -p "$scratch"
# The working tree as git sees it (tracked and untracked-but-not-ignored files).
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -f "$f" ]] && cp --parents -- "$f" "$scratch/"
done

# Fill in the module list and the test selection of [tool.mutmut].
"$python" - "$scratch/pyproject.toml" "${#modules[@]}" "${modules[@]}" "${tests[@]}" <<'EOF'
import json, re, sys
path, n = sys.argv[1], int(sys.argv[2])
modules, tests = sys.argv[3:3 + n], sys.argv[3 + n:]
text = open(path).read()
for key, value in (("only_mutate", modules), ("pytest_add_cli_args_test_selection", tests)):
    text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(value)}", text)
    if count != 1:
        sys.exit(f"mutation.sh: pyproject.toml needs exactly one `{key} = ...` line in [tool.mutmut]")
open(path, "w").write(text)
EOF

cd "$scratch"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
"$mutmut" run --max-children "${MUTATION_JOBS:-1}" > run.log 2>&1 || { tail -c 4000 run.log; exit 1; }
"$mutmut" results --all true > results.txt

echo "mutmut $("$mutmut" --version | awk '{print $NF}'), $(date -u +%Y-%m-%d), commit $(git -C "$root" rev-parse --short HEAD)"
"$python" - results.txt <<'EOF'
import collections, sys
by_module = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    name, _, status = line.strip().rpartition(": ")
    if name:
        module = name.split(".x_")[0].split(".xǁ")[0]
        by_module[module][status] += 1
for module, counts in sorted(by_module.items()):
    total = sum(counts.values())
    others = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
    print(f"{module}: killed {counts['killed']}/{total}" + (f" ({others})" if others else ""))
EOF
{ grep -v ': killed$' results.txt || true; } | while read -r name status; do
    name="${name%:}"
    echo
    "$mutmut" show "$name" | grep -v '^\(---\|+++\)'
done
