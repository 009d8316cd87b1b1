#!/usr/bin/env bash
# The one prepared GPU check (issues 21 and 29). Run once on a GPU machine, from anywhere:
#
#     pipelines/bench/gpu_check.sh                      # CUDA, about 7 minutes on one H200 (estimate below)
#     pipelines/bench/gpu_check.sh --wheels DIR         # first install DIR's wheels (gpu_wheels.sh DIR), --no-index
#     pipelines/bench/gpu_check.sh --dry-run            # the same steps on the CPU at tiny sizes (~2-3 min here)
#     pipelines/bench/gpu_check.sh --only bench-cam,real-oom   # only these steps (a rerun; dependencies are yours)
#
# Python: $PYTHON when set, else .venv/bin/python (what `make setup` builds); else it says what it
# needs and stops. --wheels DIR installs every wheel of DIR with `pip install --no-index --no-deps
# --target WORK/site` (a scratch folder put on PYTHONPATH behind the checkout: the machine's own
# torch is used and nothing of the machine's Python changes). Then the imports the steps need are
# checked, and what is missing is named in one line (exit 2).
#
# Steps, most important figures first, each one "STEP <name>: ok|FAILED|skipped ..." line (with the
# stage's own summary line, or the benchmark table below it):
#   bench-cam    bench_cam_stage.py: random-weight ViT-B/16 at VOC size, bf16 vs fp32, batch 1/32, workers
#                0/8: images/s, peak GPU memory, GPU busy %, share of the bf16 matmul roofline
#                (--dry-run: clipes-tiny, one image, fp32, batch 1, workers 0)
#   bench-grads  bench_cam.py: ViT-B/16's last block, closed-form gradients vs autograd (ratio, max difference),
#                GradCAM loops, [4] the cam stage under fp16/bf16 autocast (--dry-run: 48x64, bf16 CPU autocast)
#   toy, cam     a toy dataset and clipes cam on it --device $DEV (what bench-refine and the later steps read)
#   bench-refine bench_refine_methods.py at VOC size: PAMR on $DEV vs dense CRF on one CPU core
#   real-oom     real_oom.py: a batch sized to need 1.3x the free GPU memory runs out of memory for real, is
#                retried one image at a time, and its records equal a batch-1 run's (--dry-run: simulated)
#   refine, train, segment, label   the CLI on the toy run --device $DEV (train with --precision auto)
#   tests        the tests that run on cuda (pytest -k cuda; --dry-run: their cpu twins)
#   torchrun-cam, torchrun-refine, torchrun-train   torchrun --nproc_per_node 2 (nccl needs 2 GPUs: with
#                fewer, torchrun-train runs on the CPU with gloo and says so)
#
# Output: everything printed is also written to $OUT/gpu_check-summary.txt (when OUT is set), which
# alone gives each step's result and figures; every step's full log goes into one archive,
# $OUT/gpu_check-logs.tar.gz. Those are the only two files written to $OUT. The last line is
# "gpu_check: N steps, F failed, S skipped".
#
# Time (CUDA): each step runs under a time limit, and once BUDGET seconds (default 480) have passed
# the steps left are skipped, so the check ends inside a 10-minute command. The estimate for one
# H200, about 7 minutes: each step's fixed cost measured by the CPU dry run here (process starts,
# imports, model builds: 5-12 s a process) plus its compute from the work it does (bench-cam: 8
# child processes of about 15 s each at 256 images; bench-grads ~30 s; toy + cam ~25 s; bench-refine
# ~45 s, bound by the CPU's dense CRF on 50 VOC-size images; real-oom ~30 s; refine/train/segment/
# label ~60 s; tests ~60 s; torchrun ~90 s).
#
# Environment: PYTHON, WORK (scratch folder; default a new temp folder), OUT, BUDGET (seconds).
set -u
DRY=0
WHEELS=
ONLY=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --wheels needs a folder (made by pipelines/bench/gpu_wheels.sh DIR)" >&2; exit 2; }
      WHEELS=$2; shift ;;
    --only)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --only needs comma-separated step names" >&2; exit 2; }
      ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (valid: --dry-run, --wheels DIR, --only STEP,STEP)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 ||
    { echo "gpu_check.sh: --wheels $WHEELS: no *.whl there; make them with pipelines/bench/gpu_wheels.sh $WHEELS" >&2; exit 2; }
  WHEELS=$(cd "$WHEELS" && pwd)
fi
cd "$(dirname "$0")/../.." || exit 1
. pipelines/bench/find_python.sh gpu_check.sh "a Python with torch: build .venv (make setup), or set PYTHON=/path/to/python (e.g. the machine's own, PYTHON=python3, with --wheels DIR for the other packages)"
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: PYTHON=$PY is not an executable" >&2; exit 2; }
WORK=${WORK:-$(mktemp -d -t gpu-check-XXXXXX)}
LOGS=$WORK/logs
mkdir -p "$LOGS"
SUMMARY=
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  SUMMARY=$OUT/gpu_check-summary.txt
  : >"$SUMMARY"
fi
say() { printf '%s\n' "$*"; [ -z "$SUMMARY" ] || printf '%s\n' "$*" >>"$SUMMARY"; }
emit() { if [ -n "$SUMMARY" ]; then tee -a "$SUMMARY"; else cat; fi; }
archive() { [ -z "${OUT:-}" ] || tar -czf "$OUT/gpu_check-logs.tar.gz" -C "$WORK" logs 2>/dev/null; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "$WHEELS" ]; then  # before anything imports: the check's packages on the machine's torch
  t0=$(date +%s)
  if "$PY" -m pip install --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl >"$LOGS/wheels.log" 2>&1; then
    say "STEP wheels: ok ($(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS installed with --no-index into $WORK/site, $(( $(date +%s) - t0 )) s)"
  else
    say "STEP wheels: FAILED (pip install --no-index from $WHEELS; a wheel built for another Python or platform is refused):"
    tail -n 8 "$LOGS/wheels.log" | sed 's/^/    /' | emit
    archive
    exit 2
  fi
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

# the imports every step needs, named by what to install when missing (one line)
if ! "$PY" - >"$LOGS/imports.log" 2>&1 <<'EOF'
import importlib
import sys

need = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow",
        "cv2": "opencv-python-headless", "open_clip": "open_clip_torch", "ftfy": "ftfy", "timm": "timm",
        "pydensecrf": "pydensecrf2", "pycocotools": "pycocotools", "typer": "typer", "tqdm": "tqdm",
        "pytest": "pytest", "clip_es": "clip_es (this checkout)"}
missing = []
for module, package in need.items():
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install is as missing as an absent one
        missing.append(f"{package} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else module})")
if missing:
    print(f"gpu_check.sh: {sys.executable} lacks: {'; '.join(missing)}; bring them with "
          "pipelines/bench/gpu_wheels.sh DIR (on a machine with a package index) and --wheels DIR")
    sys.exit(1)
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
EOF
then
  say "$(tail -n 1 "$LOGS/imports.log")"
  archive
  exit 2
fi
VERSIONS=$(tail -n 1 "$LOGS/imports.log")

if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=1
  DEV=cpu; N=6; STEPS=2; TESTS=(tests/test_pamr.py -k cpu); PREC=(--precision auto)
  BENCH_CAM=(--device cpu --model clipes-tiny --n 1 --precisions fp32 --batches 1 --workers 0 --busy --roofline)
  BENCH_REFINE=(--device cpu --n 3 --size voc); THREADS=(--threads 1)
  BENCH_GRADS=(--device cpu --threads 1 --size 48x64 --repeats 1 --no-peak --autocast bf16)
  OOM=(--device cpu --dry-run)
  NGPU=0; BUDGET=${BUDGET:-100000}; LIMIT=600
else
  DEV=cuda; N=96; STEPS=30; TESTS=(tests -k cuda); PREC=(--precision auto)
  BENCH_CAM=(--device cuda --n 256 --precisions bf16,fp32 --batches 1,32 --workers 0,8 --busy --roofline)
  BENCH_REFINE=(--device cuda --n 50 --size voc); THREADS=()
  BENCH_GRADS=(--device cuda --repeats 5)
  OOM=(--device cuda)
  BUDGET=${BUDGET:-480}; LIMIT=240
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$NGPU" -lt 1 ]; then
    say "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.device_count() = $NGPU; $VERSIONS); use --dry-run on a CPU machine"
    archive
    exit 2
  fi
fi
say "gpu_check: mode $([ "$DRY" = 1 ] && echo dry-run || echo cuda), device $DEV, $NGPU GPU(s), $VERSIONS, python $PY, work folder $WORK"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
  sed 's/^/gpu_check: GPU /' | emit

START=$(date +%s); TOTAL=0; FAILED=0; SKIPPED=0
step() {  # step NAME SHOW COMMAND... ; SHOW=1 puts the whole table in the summary, else the log's last line
  local name=$1 show=$2 t0 t1 rc secs last
  shift 2
  [ -z "$ONLY" ] || [ "${ONLY#*,"$name",}" != "$ONLY" ] || return 0
  TOTAL=$((TOTAL + 1))
  if [ $(( $(date +%s) - START )) -ge "$BUDGET" ]; then
    SKIPPED=$((SKIPPED + 1))
    say "STEP $name: skipped (the ${BUDGET} s budget is spent)"
    return 0
  fi
  t0=$(date +%s%N)
  timeout -k 10 "$LIMIT" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  secs=$(printf '%d.%d' $(((t1 - t0) / 1000000000)) $((((t1 - t0) / 100000000) % 10)))
  last=$(grep -v -e '^\s*$' -e 'it/s]' -e 'img/s]' -e 'step/s]' -e '^\s*warnings' "$LOGS/$name.log" | tail -n 1 |
         cut -c1-400)
  if [ "$rc" = 0 ]; then
    if [ "$show" = 1 ]; then
      say "STEP $name: ok ($secs s)"
      grep -v -e '^\s*$' -e 'it/s]' -e 'img/s]' "$LOGS/$name.log" | sed 's/^/    /' | emit
    else
      say "STEP $name: ok ($secs s): $last"
    fi
  else
    FAILED=$((FAILED + 1))
    [ "$rc" = 124 ] && rc="124 (over its ${LIMIT} s limit)"
    say "STEP $name: FAILED rc=$rc ($secs s)"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/    /' | emit
  fi
  return 0
}

CLIPES=("$PY" -m clip_es)
TORCHRUN2=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m clip_es)

step bench-cam 1 "$PY" pipelines/bench/bench_cam_stage.py "${BENCH_CAM[@]}"
step bench-grads 1 "$PY" pipelines/bench/bench_cam.py "${BENCH_GRADS[@]}"
step toy 0 "${CLIPES[@]}" toy make -o "$WORK/toy" --n "$N" --val-fraction 0.25
step cam 0 "${CLIPES[@]}" cam -d voc -r "$WORK/toy" -s train -o "$WORK/run" --device "$DEV" "${THREADS[@]}"
step bench-refine 1 "$PY" pipelines/bench/bench_refine_methods.py --run "$WORK/run" "${BENCH_REFINE[@]}"
step real-oom 0 "$PY" pipelines/bench/real_oom.py "${OOM[@]}"
step refine 0 "${CLIPES[@]}" refine --run "$WORK/run" --method pamr --device "$DEV" "${THREADS[@]}"
step train 0 "${CLIPES[@]}" train --run "$WORK/run" --steps "$STEPS" --batch-size 4 --crop-size 128 --save-every "$STEPS" \
  --device "$DEV" "${PREC[@]}" "${THREADS[@]}"
step segment 0 "${CLIPES[@]}" segment -c "$WORK/run/segmenter/model.pt" -d voc -r "$WORK/toy" -s val -o "$WORK/segment" \
  --device "$DEV" "${THREADS[@]}"
mkdir -p "$WORK/folder" && cp "$WORK"/toy/JPEGImages/*.jpg "$WORK/folder/" 2>/dev/null
step label 0 "${CLIPES[@]}" label "$WORK/folder" -o "$WORK/label" --classes "ball,star,heart,ring,boat,kite,flower,fish" \
  --device "$DEV" "${THREADS[@]}"
step tests 0 "$PY" -m pytest -x -q -p no:cacheprovider "${TESTS[@]}"
step torchrun-cam 0 "${TORCHRUN2[@]}" cam -d voc -r "$WORK/toy" -s train -o "$WORK/run-ddp" --device "$DEV"
if [ "$DEV" = cuda ] && [ "$NGPU" -lt 2 ]; then
  say "gpu_check: torchrun-train on cuda needs 2 GPUs (nccl refuses two ranks on one GPU); $NGPU here, so it runs on the CPU (gloo)"
  TRAIN_DEV=cpu
else
  TRAIN_DEV=$DEV
fi
step torchrun-refine 0 "${TORCHRUN2[@]}" refine --run-dir "$WORK/run-ddp" --method pamr --device "$DEV" --workers 1
step torchrun-train 0 env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m clip_es \
  train --run-dir "$WORK/run-ddp" --steps "$STEPS" --batch-size 2 --crop-size 128 --save-every "$STEPS" \
  --device "$TRAIN_DEV"
say "gpu_check: $TOTAL steps, $FAILED failed, $SKIPPED skipped ($(( $(date +%s) - START )) s)"
archive
[ "$FAILED" = 0 ] && [ "$SKIPPED" = 0 ]
