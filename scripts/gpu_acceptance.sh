#!/usr/bin/env bash
# The GPU acceptance run of issue 26 (python -m bench.gpu_acceptance) as one command for a GPU
# session: installs nothing beyond the project's venv, stops the run after LIMIT seconds and
# copies the result to bench/results/ and to $OUT when set.
#
#   scripts/gpu_acceptance.sh [more bench.gpu_acceptance arguments, e.g. --arch llava-1.5-7b]
#
# PY     the Python to run (default .venv/bin/python, made by `make install` when missing, which
#        needs PyPI; on an offline machine point PY at a Python with the project installed)
# LIMIT  seconds before the run is stopped (default 480, the issue's 8 minutes); the JSON is
#        written after every architecture, so a stopped run keeps the ones that finished
# OUT    a folder the result is also copied to (the device machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  [[ -x .venv/bin/python ]] || make install
  PY=.venv/bin/python
fi
LIMIT=${LIMIT:-480}
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else f"no CUDA device visible to {sys.executable} (torch {torch.__version__})")'
results=$(mktemp -d)
rc=0
timeout --kill-after=30 "$LIMIT" "$PY" -m bench.gpu_acceptance --out "$results" "$@" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "stopped after $LIMIT s: the result keeps the architectures that finished" >&2
fi
shopt -s nullglob
files=("$results"/gpu-*.json)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "no result written (exit $rc)" >&2
  exit $(( rc == 0 ? 1 : rc ))
fi
mkdir -p bench/results
cp "${files[@]}" bench/results/
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "${files[@]}" "$OUT"/
fi
echo "result: ${files[*]##*/} (bench/results${OUT:+ and $OUT})"
exit $rc
