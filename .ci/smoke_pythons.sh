#!/usr/bin/env bash
# Smoke run on the oldest and the newest Python that setup.cfg's python_requires covers, where such interpreters
# are on this machine: a fresh virtual environment, README's install command, `finetune check` on a run file,
# and a fast subset of the tests. An interpreter that is not here is skipped with a message.
#
# The environments live in $FINETUNE_CI_CACHE (default ~/.cache/finetune-ci) so that a second CI run on the same
# machine reinstalls only what changed; a new machine builds them from nothing (torch's wheel for another
# interpreter comes from PyPI, with its CUDA libraries: a few GB the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${FINETUNE_CI_CACHE:-$HOME/.cache/finetune-ci}
oldest=$(sed -n 's/^python_requires *= *>= *3\.\([0-9]*\).*/\1/p' setup.cfg)
[ -n "$oldest" ] || { echo "smoke: cannot read python_requires from setup.cfg" >&2; exit 1; }

find_python() {  # the interpreter python3.N: on PATH (and runnable), else a pyenv or system install
    local n=$1 candidate
    for candidate in "$(command -v "python3.$n" 2>/dev/null || true)" "$HOME"/.pyenv/versions/3."$n".*/bin/python3."$n" \
                     /usr/bin/python3."$n" /usr/local/bin/python3."$n"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import venv' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

newest=""
for n in $(seq 30 -1 "$oldest"); do
    if find_python "$n" >/dev/null; then newest=$n; break; fi
done

tested=() skipped=()
smoke() {
    local n=$1 py venv version run
    if ! py=$(find_python "$n"); then
        skipped+=("3.$n (no python3.$n on this machine)")
        echo "smoke: Python 3.$n is not on this machine: skipped"
        return 0
    fi
    version=$("$py" -c 'import platform; print(platform.python_version())')
    venv="$CACHE/venv-3.$n"
    echo "smoke: Python $version ($py) in $venv"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    # README's install command, in that environment (non-editable: the package as a user installs it)
    "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 ".[dev]"
    run=$(mktemp -d)
    printf '%s\n' '{"source": "teh cat", "target": "the cat"}' '{"source": "recieve", "target": "receive"}' \
        '{"source": "adress", "target": "address"}' '{"source": "wich", "target": "which"}' > "$run/pairs.jsonl"
    cat > "$run/run.toml" <<EOF
[model]
name = "tiny-bart"
[data]
train = "$run/pairs.jsonl"
eval = "$run/pairs.jsonl"
[train]
lr = 3e-3
batch_size = 4
max_steps = 4
precision = "fp32"
output_dir = "$run/out"
progress = false
EOF
    (cd "$run" && FINETUNE_CACHE="$run/cache" "$venv/bin/finetune" check run.toml --steps 100)
    rm -rf "$run"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/data/test_collate.py tests/data/test_pairs.py \
        tests/train/test_loss.py tests/test_bad_inputs.py
    tested+=("$version")
}

smoke "$oldest"
if [ -n "$newest" ] && [ "$newest" != "$oldest" ]; then
    smoke "$newest"
elif [ -z "$newest" ]; then
    skipped+=("the newest (no Python >= 3.$oldest found)")
fi
echo "smoke-tested interpreters: ${tested[*]:-none}${skipped:+; skipped: ${skipped[*]}}"
