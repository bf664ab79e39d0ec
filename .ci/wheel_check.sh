#!/usr/bin/env bash
# The package as people install it: build a wheel and an sdist, check them with twine, check
# the bundled files are inside, install the wheel into a fresh virtual environment (the CPU
# torch pin of constraints.txt) and run `moorelm --help`, a tiny `train` and `generate` there,
# away from the checkout. Needs `build` and `twine` in $PYTHON (default: .venv/bin/python)
# and PyPI or a local index for the wheel's dependencies.
#   .ci/wheel_check.sh            (tests/test_wheel.py runs it when MOORELM_WHEEL_CHECK=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH  # the installed package, never this checkout

echo "== build"
"$PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
echo "== twine check"
"$PYTHON" -m twine check --strict "$WORK"/dist/*

echo "== bundled files"
"$PYTHON" - "$WORK/dist" <<'PYEOF'
import sys, tarfile, zipfile
from pathlib import Path

dist = Path(sys.argv[1])
need = ["moorelm/serve/static/index.html", "moorelm/scaling/landmarks.csv",
        "moorelm/finetune/tasks.py", "moorelm/cli/config_files.py",
        "moorelm/tasks/moorelm_genre.yaml", "moorelm/tasks/genre_test.jsonl"]
wheel = zipfile.ZipFile(next(dist.glob("*.whl"))).namelist()
sdist = [n.split("/", 1)[1] for n in tarfile.open(next(dist.glob("*.tar.gz"))).getnames() if "/" in n]
for name, files in (("wheel", wheel), ("sdist", sdist)):
    missing = [n for n in need if n not in files]
    if missing:
        sys.exit(f"the {name} lacks {missing}")
    print(f"{name}: {len(files)} files, bundled data present")
PYEOF

echo "== fresh venv"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --constraint "$ROOT/constraints.txt" "$WORK"/dist/*.whl
cd "$WORK"
MOORELM_CACHE="$WORK/cache"
export MOORELM_CACHE
"$WORK/venv/bin/moorelm" --help >/dev/null
"$WORK/venv/bin/moorelm" --version
"$WORK/venv/bin/python" -c "import moorelm, sys; assert moorelm.__file__.startswith('$WORK'), moorelm.__file__"
echo "== tiny train"
"$WORK/venv/bin/moorelm" train --preset tiny --max-steps 5 --batch-size 4 --eval-iters 1 \
  --plays hamlet --threads 1 --out "$WORK/run" --quiet
echo "== generate"
"$WORK/venv/bin/moorelm" generate "$WORK/run" --prompt "HAMLET:" --max-new-tokens 20 --seed 0 --device cpu
echo "== wheel check passed"
