#!/usr/bin/env bash
# End-to-end reproduction, one stage per line; copy any line to run a stage alone.
#
#   bash run.sh          the whole pipeline on the tiny default (CPU, minutes)
#   bash run.sh test     lint + the test suite
#
# Set-up is automatic: .venv is created and the pinned requirements installed when missing.
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
  tiny)  # synthetic world -> tiny model -> SFT -> labels -> Voyager -> GRPO / KTR -> evaluations
    OUT=outputs/tiny
    stage data      $OUT/data/test.json           python -m common.tinyworld --out $OUT/data --train 2000 --test 400 --seed 0
    stage model     $OUT/model/config.json        python -m common.models build-tiny --out $OUT/model --max-pixels 3136 --seed 0
    stage sft       $OUT/sft/final/config.json    python train_sft.py --config configs/tiny/sft.yaml
    stage label     $OUT/labels/summary.json      python label_frames.py --config configs/tiny/label.yaml
    stage voyager   $OUT/voyager/voyager.json     python train_voyager.py --config configs/tiny/voyager.yaml
    stage grpo      $OUT/grpo/final/config.json   python train_ktr.py --config configs/tiny/grpo.yaml
    stage ktr       $OUT/ktr/final/config.json    python train_ktr.py --config configs/tiny/ktr.yaml
    for run in sft grpo ktr; do  # question answering with 8 uniform frames
      stage eval_$run $OUT/eval/${run}_uniform/summary.json \
        python eval.py --config configs/tiny/eval.yaml model=$OUT/$run/final output_dir=$OUT/eval/${run}_uniform
    done
    EVAL4="python eval.py --config configs/tiny/eval.yaml model=$OUT/sft/final frames.num=4"  # frame selection: T=4
    stage eval_uniform4   $OUT/eval/sft_uniform4/summary.json    $EVAL4 output_dir=$OUT/eval/sft_uniform4
    stage eval_retrieval4 $OUT/eval/sft_retrieval4/summary.json  $EVAL4 output_dir=$OUT/eval/sft_retrieval4 \
      frames.strategy=retrieval frames.candidates=16
    stage eval_voyager4   $OUT/eval/sft_voyager4/summary.json    $EVAL4 output_dir=$OUT/eval/sft_voyager4 \
      frames.strategy=voyager frames.voyager=$OUT/voyager frames.candidates=16
    stage eval_voyager4_m32 $OUT/eval/sft_voyager4_m32/summary.json $EVAL4 output_dir=$OUT/eval/sft_voyager4_m32 \
      frames.strategy=voyager frames.voyager=$OUT/voyager frames.candidates=32
    python -m common.results --out $OUT
    ;;
  *)
    echo "usage: bash run.sh [tiny|test]" >&2; exit 2
    ;;
esac
