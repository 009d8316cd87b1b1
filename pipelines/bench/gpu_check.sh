#!/usr/bin/env bash
# The one prepared GPU check (issue 21, item 4). Run once on a GPU machine, from the repository root:
#
#     pipelines/bench/gpu_check.sh              # CUDA, about 6-8 minutes on one H200
#     pipelines/bench/gpu_check.sh --dry-run    # the same steps on the CPU at tiny sizes, about a minute
#
# Steps, each printed as one "STEP <name>: ok|FAILED ..." line (its log under $WORK/<name>.log; a
# failed step prints the log's tail and the check goes on to the next one):
#   tests        the tests that run on cuda when there is one (pytest -k cuda; --dry-run: their cpu twins)
#   toy          a toy dataset (clipes toy make)
#   cam          clipes cam, bundled tiny CLIP, --device $DEV
#   refine       clipes refine --method pamr --device $DEV
#   train        clipes train (a few steps) --device $DEV
#   segment      clipes segment with the trained checkpoint --device $DEV
#   label        clipes label on a folder of images --device $DEV
#   torchrun-cam   torchrun --nproc_per_node 2 clipes cam (ranks share the GPUs there are)
#   torchrun-refine  the same for clipes refine --method pamr (the masks torchrun-train reads)
#   torchrun-train torchrun --nproc_per_node 2 clipes train (nccl needs 2 GPUs: with fewer it runs on the
#                  CPU with gloo and says so)
#   bench-cam    bench_cam_stage.py: random-weight ViT-B/16 at VOC size, bf16 and fp32, batch 1/16/32,
#                workers 0/8: images/s, peak GPU memory, GPU busy %, share of the bf16 matmul roofline
#                (--dry-run: clipes-tiny, one image, fp32, batch 1, workers 0)
#   bench-refine bench_refine_methods.py at VOC size: PAMR on $DEV vs dense CRF on one CPU core
#   bench-grads  bench_cam.py: ViT-B/16's last block, closed-form gradients vs autograd's backward on $DEV
#                (ratio and max difference of the maps), GradCAM loops, fp16/bf16 stage rates
#                (--dry-run: a 48x64 image, one repeat)
# The benchmark tables are printed in full. The last line is "gpu_check: N steps, F failed".
#
# Environment: PYTHON (default python3), WORK (a scratch folder; default a new temp folder),
# OUT (when set, every log is copied there too).
set -u
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg (valid: --dry-run)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=1
  DEV=cpu; N=6; STEPS=2; TESTS=(tests/test_pamr.py -k cpu)
  BENCH_CAM=(--device cpu --model clipes-tiny --n 1 --precisions fp32 --batches 1 --workers 0 --busy --roofline)
  BENCH_REFINE=(--device cpu --n 3 --size voc); THREADS=(--threads 1)
  BENCH_GRADS=(--device cpu --threads 1 --size 48x64 --repeats 1 --no-peak --autocast bf16)
  NGPU=0
else
  DEV=cuda; N=96; STEPS=30; TESTS=(tests -k cuda)
  BENCH_CAM=(--device cuda --n 256 --precisions bf16,fp32 --batches 1,16,32 --workers 0,8 --busy --roofline)
  BENCH_REFINE=(--device cuda --n 50 --size voc); THREADS=()
  BENCH_GRADS=(--device cuda --repeats 5)
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$NGPU" -lt 1 ]; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.device_count() = $NGPU); use --dry-run on a CPU machine" >&2
    exit 2
  fi
fi
echo "gpu_check: mode $([ "$DRY" = 1 ] && echo dry-run || echo cuda), device $DEV, $NGPU GPU(s), work folder $WORK"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
  sed 's/^/gpu_check: GPU /'

TOTAL=0; FAILED=0
step() {  # step NAME SHOW COMMAND... ; SHOW=1 prints the whole log (benchmark tables)
  local name=$1 show=$2 t0 t1 rc
  shift 2
  TOTAL=$((TOTAL + 1))
  t0=$(date +%s%N)
  "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  local secs
  secs=$(printf '%d.%d' $(((t1 - t0) / 1000000000)) $((((t1 - t0) / 100000000) % 10)))
  [ -n "${OUT:-}" ] && cp "$WORK/$name.log" "$OUT/" 2>/dev/null
  if [ "$rc" = 0 ]; then
    printf 'STEP %s: ok (%s s)\n' "$name" "$secs"
    [ "$show" = 1 ] && grep -v -e '^\s*$' -e 'it/s]' -e 'img/s]' "$WORK/$name.log" | sed 's/^/    /'
  else
    FAILED=$((FAILED + 1))
    printf 'STEP %s: FAILED rc=%s (%s s)\n' "$name" "$rc" "$secs"
    tail -n 25 "$WORK/$name.log" | sed 's/^/    /'
  fi
  return 0
}

clipes() { "$PY" -m clip_es "$@"; }
torchrun2() { "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m clip_es "$@"; }

step tests 0 "$PY" -m pytest -x -q -p no:cacheprovider "${TESTS[@]}"
step toy 0 clipes toy make -o "$WORK/toy" --n "$N" --val-fraction 0.25
step cam 0 clipes cam -d voc -r "$WORK/toy" -s train -o "$WORK/run" --device "$DEV" "${THREADS[@]}"
step refine 0 clipes refine --run "$WORK/run" --method pamr --device "$DEV" "${THREADS[@]}"
step train 0 clipes train --run "$WORK/run" --steps "$STEPS" --batch-size 4 --crop-size 128 --save-every "$STEPS" \
  --device "$DEV" "${THREADS[@]}"
step segment 0 clipes segment -c "$WORK/run/segmenter/model.pt" -d voc -r "$WORK/toy" -s val -o "$WORK/segment" \
  --device "$DEV" "${THREADS[@]}"
mkdir -p "$WORK/folder" && cp "$WORK"/toy/JPEGImages/*.jpg "$WORK/folder/" 2>/dev/null
step label 0 clipes label "$WORK/folder" -o "$WORK/label" --classes "ball,star,heart,ring,boat,kite,flower,fish" \
  --device "$DEV" "${THREADS[@]}"
step torchrun-cam 0 torchrun2 cam -d voc -r "$WORK/toy" -s train -o "$WORK/run-ddp" --device "$DEV"
if [ "$DEV" = cuda ] && [ "$NGPU" -lt 2 ]; then
  echo "gpu_check: torchrun-train on cuda needs 2 GPUs (nccl refuses two ranks on one GPU); $NGPU here, so it runs on the CPU (gloo)"
  TRAIN_DEV=cpu
else
  TRAIN_DEV=$DEV
fi
step torchrun-refine 0 torchrun2 refine --run-dir "$WORK/run-ddp" --method pamr --device "$DEV" --workers 1
step torchrun-train 0 env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m clip_es \
  train --run-dir "$WORK/run-ddp" --steps "$STEPS" --batch-size 2 --crop-size 128 --save-every "$STEPS" \
  --device "$TRAIN_DEV"
step bench-cam 1 "$PY" pipelines/bench/bench_cam_stage.py "${BENCH_CAM[@]}"
step bench-refine 1 "$PY" pipelines/bench/bench_refine_methods.py --run "$WORK/run" "${BENCH_REFINE[@]}"
step bench-grads 1 "$PY" pipelines/bench/bench_cam.py "${BENCH_GRADS[@]}"
echo "gpu_check: $TOTAL steps, $FAILED failed"
[ "$FAILED" = 0 ]
