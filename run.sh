#!/usr/bin/env bash
# End-to-end reproduction, one stage per line; copy any line to run a stage alone.
#
#   bash run.sh          the whole pipeline on the tiny default (CPU, minutes)
#   bash run.sh test     lint + the test suite
#
# A stage whose output already exists is skipped, so a rerun after an interruption continues.
set -euo pipefail
cd "$(dirname "$0")"

setup() {  # .venv with the pinned requirements, reinstalled only when requirements.txt changes
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local want; want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat .venv/.requirements.sha 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt
    echo "$want" > .venv/.requirements.sha
  fi
  export PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
}

stage() {  # stage NAME DONE_MARKER command...: run unless DONE_MARKER exists, record seconds taken
  local name=$1 marker=$2; shift 2
  if [ -e "$marker" ]; then echo "== $name: done already ($marker)"; return; fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  mkdir -p "$OUT"
  echo "{\"stage\": \"$name\", \"seconds\": $((SECONDS - start))}" >> "$OUT/timings.jsonl"
  echo "== $name: finished in $((SECONDS - start)) s -> $marker"
}

setup
case "${1:-tiny}" in
  test)
    ruff check .
    exec python -m pytest tests
    ;;
  tiny)
    OUT=outputs/tiny
    stage data  $OUT/data/test.json      python -m common.tinyworld --out $OUT/data --train 2000 --test 400 --seed 0
    stage model $OUT/model/config.json   python -m common.models build-tiny --out $OUT/model --seed 0
    ;;
  *)
    echo "usage: bash run.sh [tiny|test]" >&2; exit 2
    ;;
esac
