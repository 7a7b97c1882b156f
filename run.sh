#!/usr/bin/env bash
# End-to-end reproduction, one stage per line; copy any line to run a stage alone.
#
#   bash run.sh          the whole pipeline on the tiny default (CPU, minutes)
#   RL_SEEDS=3 bash run.sh   the same with GRPO and KTR trained and evaluated over 3 seeds
#   ARCH=qwen3_vl bash run.sh  the same on another family's tiny model (qwen2_5_vl default, qwen3_vl,
#                        llava_onevision) -> outputs/tiny_$ARCH
#   CROSS_VOYAGER=outputs/tiny/voyager ARCH=llava_onevision bash run.sh   adds frames picked by another model's scorer
#   CANDIDATES=16 bash run.sh   frame selection from M = 16 uniform candidates only (default "16 32")
#   VISION_STEPS=2500 bash run.sh   pretrains the tiny vision tower first (README, "A pretrained tiny vision tower")
#                        -> outputs/tiny_tower (the default keeps the random tower of the README's tables)
#   bash run.sh tower    Frame-Voyager's recipe on that tower: VISION_STEPS=2500 N_LABEL=4800
#                        LABEL_ARGS=max_combinations=32 VOYAGER_ARGS="epochs=30 coverage=true" RL_ARGS=temperature=0.7
#                        (README, "Frame-Voyager on the tower"); any of them set in the environment wins
#   UNDERCOUNT=0.5 bash run.sh   SFT on the traces of a teacher that misses the last shape of half the count
#                        questions (README, "An imperfect teacher") -> outputs/tiny_undercount
#   ALL_FRAMES=1 bash run.sh   adds the SFT model on all 64 frames (a probe: far outside its training, it fails)
#   RL_FRAMES=voyager bash run.sh   GRPO and KTR train on the 8 frames the Voyager scorer picks from 16 candidates,
#                        and are judged on them (runs grpo_voyager, ktr_voyager; the scorer is trained first);
#                        RL_FRAMES="uniform voyager" runs both (default uniform)
#   RL_ARGS="temperature=0.7" LABEL_ARGS="max_combinations=32" VOYAGER_ARGS="epochs=30 coverage=true" bash run.sh
#                        config overrides for every GRPO / KTR run, the labels and the Voyager scorer (a stage
#                        already done is not redone: use a new OUT)
#   JOBS=1 bash run.sh   one stage at a time (default 2: after SFT, stages run side by side, logs in OUT/logs)
#   bash run.sh ablation the paper's ablation on the tiny default (GRPO, each signal alone, all three; RL_SEEDS, default 3)
#   bash run.sh test     lint + the test suite
#   bash run.sh paper [--dry-run]   the paper-scale recipe on GPUs (paths: configs/paper/paths.env)
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
  local start=$SECONDS
  if [ -n "${LOGS:-}" ]; then  # running side by side with other stages (pool): the output goes to a log
    mkdir -p "$LOGS"
    echo "== $name: $* (log: $LOGS/$name.log)"
    "$@" > "$LOGS/$name.log" 2>&1 || {
      local rc=$?; echo "== $name: FAILED (exit $rc); the end of $LOGS/$name.log:"; tail -n 20 "$LOGS/$name.log"
      return $rc; }
  else
    echo "== $name: $*"
    "$@"
  fi
  mkdir -p "$OUT"
  echo "{\"stage\": \"$name\", \"seconds\": $((SECONDS - start))}" >> "$OUT/timings.jsonl"
  echo "== $name: finished in $((SECONDS - start)) s -> $marker"
}

# After SFT every stage needs only the SFT model, and the tiny model keeps a core only partly busy (one
# process at 2 threads is 1.3x one at 1 thread), so JOBS of them run side by side, one thread each on 2
# cores. Their numbers do not change: a stage gives the same results at 1 or 2 threads.
JOBS=${JOBS:-2}
THREADS=$(( $(nproc) / JOBS )); [ $THREADS -ge 1 ] || THREADS=1
PIDS=()
pool() {  # pool COMMAND...: run COMMAND (a stage, or a function running stages in order) in the background
          # once fewer than JOBS run, its stages' output in $OUT/logs/NAME.log; JOBS=1: in the foreground
  if [ "$JOBS" -le 1 ]; then "$@"; return; fi
  wait_below "$JOBS"
  LOGS=$OUT/logs OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS} "$@" &
  PIDS+=($!)
}
wait_below() {  # wait_below N: until fewer than N pooled commands run; a failed one stops run.sh here (set -e)
  local pid alive
  while true; do
    alive=()
    for pid in "${PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); else wait "$pid"; fi
    done
    PIDS=("${alive[@]}")
    [ ${#PIDS[@]} -lt "$1" ] && return
    sleep 1
  done
}
# If run.sh stops (a stage failed, or it was killed), the pooled stages still running stop too.
trap 'for p in "${PIDS[@]}"; do pkill -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done' EXIT

setup
MODE=${1:-tiny}
if [ "$MODE" = tower ]; then  # the tiny pipeline with the tower recipe's sizes and overrides (chosen on val-1200)
  VISION_STEPS=${VISION_STEPS:-2500} N_LABEL=${N_LABEL:-4800} LABEL_ARGS=${LABEL_ARGS-max_combinations=32}
  VOYAGER_ARGS=${VOYAGER_ARGS-epochs=30 coverage=true} RL_ARGS=${RL_ARGS-temperature=0.7}
  MODE=tiny
fi
case $MODE in
  test)
    ruff check .
    # whole files per worker; the 15 slowest tests are listed at the end (the suite should stay under 15 min)
    exec python -m pytest -n ${TEST_WORKERS:-2} --dist loadfile --no-loadscope-reorder --durations=15 tests
    ;;
  tiny|ablation)  # synthetic world -> tiny model -> SFT -> labels -> Voyager -> GRPO / KTR -> evaluations
    # Sizes in one place; the tests run the same pipeline small (e.g. N_TRAIN=16 SFT_STEPS=4 OUT=/tmp/x).
    # The paper's data shape: SFT with reasoning on the first N_SFT training videos, RL with answers only on
    # the rest (README, "Why RL lowers accuracy on the tiny default").
    ARCH=${ARCH:-qwen2_5_vl} VISION_STEPS=${VISION_STEPS:-0}
    SUFFIX=; [ "$VISION_STEPS" -gt 0 ] && SUFFIX=_tower
    UNDERCOUNT=${UNDERCOUNT:-0}; [ "$UNDERCOUNT" = 0 ] || SUFFIX=${SUFFIX}_undercount
    [ $ARCH = qwen2_5_vl ] && OUT=${OUT:-outputs/tiny$SUFFIX} || OUT=${OUT:-outputs/tiny_$ARCH$SUFFIX}
    # 4 visual tokens per frame in every family: 2 x 2 merged patches of 28 px (32 px for Qwen3-VL's 16-px patches)
    [ $ARCH = qwen3_vl ] && PIXELS=4096 || PIXELS=3136
    # Qwen3-VL's tiny model needs twice the SFT steps to see (README, "The other families": 750 -> 0.240, 1500 -> 0.343)
    [ $ARCH = qwen3_vl ] && SFT_STEPS=${SFT_STEPS:-1500}
    N_TRAIN=${N_TRAIN:-8000} N_TEST=${N_TEST:-400} SFT_STEPS=${SFT_STEPS:-750}
    N_SFT=${N_SFT:-$((N_TRAIN / 4))} N_LABEL=${N_LABEL:-600} RL_STEPS=${RL_STEPS:-150} RL_BATCH=${RL_BATCH:-16}
    [ "$MODE" = ablation ] && RL_SEEDS=${RL_SEEDS:-3} || RL_SEEDS=${RL_SEEDS:-1}
    DATA=$OUT/data SFT=$OUT/sft/final CANDIDATES=${CANDIDATES:-16 32}
    EVAL="python eval.py --config configs/tiny/eval.yaml data=$DATA/test.json"
    RL_FRAMES=${RL_FRAMES:-uniform}
    for on in $RL_FRAMES; do
      [ "$on" = uniform ] || [ "$on" = voyager ] || { echo "RL_FRAMES: '$on' is not uniform or voyager" >&2; exit 2; }
    done
    stage data    $DATA/test.json             python -m common.tinyworld --out $DATA --train $N_TRAIN --test $N_TEST --seed 0
    stage model   $OUT/model/config.json      python -m common.models build-tiny --arch $ARCH --out $OUT/model --max-pixels $PIXELS --seed 0
    BASE=$OUT/model
    if [ "$VISION_STEPS" -gt 0 ]; then  # the tower pretrained on rendered scenes (never the data's videos), then frozen
      stage tower $OUT/tower/vision_pretrain.json python -m common.vision_pretrain --model $OUT/model --out $OUT/tower \
        --steps $VISION_STEPS --scenes ${VISION_SCENES:-6000}
      BASE=$OUT/tower
    fi
    stage split   $DATA/rl.json               python -m common.data split $DATA/train.json $N_SFT $DATA/sft.json $DATA/rl.json
    SFT_DATA=$DATA/sft.json
    if [ "$UNDERCOUNT" != 0 ]; then  # the SFT traces as a teacher that undercounts writes them; RL keeps true answers
      SFT_DATA=$DATA/sft_undercount.json
      stage teacher $SFT_DATA                 python -m common.tinyworld --undercount $DATA/sft.json --rate $UNDERCOUNT \
        --out $SFT_DATA
    fi
    stage sft     $SFT/config.json            python train_sft.py --config configs/tiny/sft.yaml \
      model=$BASE data=$SFT_DATA output_dir=$OUT/sft max_steps=$SFT_STEPS
    scorer() {  # labels -> the Voyager scorer
      stage label   $OUT/labels/summary.json    python label_frames.py --config configs/tiny/label.yaml \
        model=$SFT data=$DATA/train.json output_dir=$OUT/labels limit=$N_LABEL ${LABEL_ARGS:-}
      stage voyager $OUT/voyager/voyager.json   python train_voyager.py --config configs/tiny/voyager.yaml \
        model=$SFT labels=$OUT/labels/labels.jsonl output_dir=$OUT/voyager ${VOYAGER_ARGS:-}
    }
    voyager() {  # the scorer -> the SFT model's answers on the frames it picks
      scorer
      for m in $CANDIDATES; do frames voyager $m; done
    }
    frames() {  # frames STRATEGY M: the SFT model's 8 frames picked from M uniform candidates (uniform = eval_sft)
      stage eval_$1_m$2 $OUT/eval/sft_$1_m$2/summary.json $EVAL model=$SFT output_dir=$OUT/eval/sft_$1_m$2 \
        frames.strategy=$1 frames.candidates=$2 frames.voyager=$OUT/voyager
    }
    rl() {  # rl RUN SEED FRAMES [overrides...]: train RUN (a configs/tiny/ktr.yaml variant) with SEED on FRAMES
            # (uniform, or voyager: the scorer's 8 of 16 candidates), evaluate on test with the same frames
      local run=$1 seed=$2 on=$3 config=ktr picked=; shift 3
      [ $run = grpo ] && config=grpo
      [ $on = voyager ] && run=${run}_voyager \
        picked="frames.strategy=voyager frames.voyager=$OUT/voyager frames.candidates=16"
      local name=$run$([ $seed = 0 ] || echo _seed$seed)  # seed 0 is the default pipeline's run
      stage $name $OUT/$name/final/config.json python train_ktr.py --config configs/tiny/$config.yaml \
        model=$SFT data=$DATA/rl.json output_dir=$OUT/$name max_steps=$RL_STEPS \
        batch_size=$RL_BATCH seed=$seed $picked ${RL_ARGS:-} "$@"
      stage eval_$name $OUT/eval/${name}_$on/summary.json $EVAL model=$OUT/$name/final \
        output_dir=$OUT/eval/${name}_$on $picked
    }
    # RL on Voyager's frames needs the scorer first: labels and scorer here, at every thread, before the pool
    [[ " $RL_FRAMES " = *" voyager "* ]] && scorer
    # From here on every stage needs only the SFT model: JOBS at a time (pool), the longest first. The Voyager
    # chain (labels -> scorer -> its evaluations) goes first: its stages cannot run side by side, and with
    # N_LABEL=4800 it is the longest of all.
    [ "$MODE" = ablation ] || pool voyager
    for on in $RL_FRAMES; do for seed in $(seq 0 $((RL_SEEDS - 1))); do  # GRPO and KTR: the same budget and
      pool rl ktr $seed $on                                                # seeds (a paired comparison)
      pool rl grpo $seed $on
    done; done
    if [ "$MODE" = ablation ]; then  # each signal alone: configs/tiny/ktr.yaml with the other two switched off
      for on in $RL_FRAMES; do for seed in $(seq 0 $((RL_SEEDS - 1))); do
        pool rl ktr_visual $seed $on attribution.temporal=false attribution.entropy=false
        pool rl ktr_temporal $seed $on attribution.visual=false attribution.entropy=false
        pool rl ktr_entropy $seed $on attribution.visual=false attribution.temporal=false
      done; done
    fi
    pool stage eval_sft $OUT/eval/sft_uniform/summary.json $EVAL model=$SFT output_dir=$OUT/eval/sft_uniform
    if [ "$MODE" != ablation ]; then
      for m in $CANDIDATES; do
        for s in retrieval aks dpp; do pool frames $s $m; done
        if [ -n "${CROSS_VOYAGER:-}" ]; then  # plug and play: a scorer trained on another run's model, its own backbone
          pool stage eval_voyager_cross_m$m $OUT/eval/sft_voyager_cross_m$m/summary.json $EVAL model=$SFT \
            output_dir=$OUT/eval/sft_voyager_cross_m$m frames.strategy=voyager frames.candidates=$m \
            frames.voyager=$CROSS_VOYAGER
        fi
      done
      if [ -n "${ALL_FRAMES:-}" ]; then
        pool stage eval_sft_all $OUT/eval/sft_all/summary.json $EVAL model=$SFT output_dir=$OUT/eval/sft_all \
          frames.strategy=all
      fi
    fi
    wait_below 1  # every pooled command has finished
    echo "{\"stage\": \"run.sh (wall clock of this call)\", \"seconds\": $SECONDS}" >> "$OUT/timings.jsonl"
    python -m common.results --out $OUT
    ;;
  paper)  # Qwen2.5-VL-7B (or Qwen3-VL-8B): CoT SFT -> GRPO / KTR (ZeRO-3, 8 GPUs) -> label -> Voyager -> benchmarks
    source configs/paper/paths.env
    missing=0
    for var in BASE_MODEL SFT_DATA RL_DATA LABEL_DATA BENCH_DIR; do
      [ -e "${!var}" ] || { echo "missing: $var=${!var} (set it in the environment or configs/paper/paths.env)" >&2; missing=1; }
    done
    for b in $(echo $BENCHMARKS $VOYAGER_BENCHMARKS | tr " " "\n" | sort -u); do
      [ -e "$BENCH_DIR/$b.json" ] || { echo "missing: benchmark file $BENCH_DIR/$b.json" >&2; missing=1; }
    done
    [ "${2:-}" = "--dry-run" ] && RUN=echo || RUN=
    [ $missing = 0 ] || [ -n "$RUN" ] || exit 1
    if [ -n "$RUN" ]; then  # sizes and memory per GPU from BASE_MODEL's config.json (or PAPER_ARCH's), no weights
      [ -e "$BASE_MODEL/config.json" ] && plan="--model $BASE_MODEL" || plan="--arch $PAPER_ARCH"
      python -m common.models plan $plan --gpus 8
    fi
    OUT=outputs/paper
    LAUNCH="accelerate launch --config_file $ACCELERATE_CONFIG"
    # Every stage names its inputs and output_dir here, so a done-marker is always where the stage writes.
    SFT=$OUT/sft/final
    $RUN stage sft   $SFT/config.json            $LAUNCH train_sft.py --config configs/sft.yaml \
      model=$BASE_MODEL data=$SFT_DATA output_dir=$OUT/sft
    for run in grpo ktr; do
      $RUN stage $run $OUT/$run/final/config.json $LAUNCH train_ktr.py --config configs/$run.yaml \
        model=$SFT data=$RL_DATA output_dir=$OUT/$run
    done
    $RUN stage label $OUT/label/summary.json     $LAUNCH label_frames.py --config configs/label.yaml \
      model=$SFT data=$LABEL_DATA output_dir=$OUT/label
    $RUN stage voyager $OUT/voyager/voyager.json python train_voyager.py --config configs/voyager.yaml \
      model=$SFT labels=$OUT/label/labels.jsonl output_dir=$OUT/voyager
    for run in sft grpo ktr; do for b in $BENCHMARKS; do for n in 16 32 64; do  # up to n frames at 2 fps
      $RUN stage eval_${run}_${b}_$n $OUT/eval/${run}_${b}_$n/summary.json $LAUNCH eval.py --config configs/eval.yaml \
        model=$OUT/$run/final data=$BENCH_DIR/$b.json output_dir=$OUT/eval/${run}_${b}_$n frames.max_frames=$n
    done; done; done
    # Frame-Voyager's evaluation: the SFT model sees 8 frames chosen from M uniform candidates by each strategy
    for b in $VOYAGER_BENCHMARKS; do for s in uniform retrieval aks dpp voyager; do
      $RUN stage eval_sft_${b}_8_$s $OUT/eval/sft_${b}_8_$s/summary.json $LAUNCH eval.py --config configs/eval.yaml \
        model=$SFT data=$BENCH_DIR/$b.json output_dir=$OUT/eval/sft_${b}_8_$s frames.strategy=$s frames.num=8 \
        frames.candidates=$VOYAGER_CANDIDATES frames.voyager=$OUT/voyager
    done; done
    ;;
  *)
    echo "usage: bash run.sh [tiny|tower|ablation|test|paper [--dry-run]]" >&2; exit 2
    ;;
esac
