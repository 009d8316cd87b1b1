#!/usr/bin/env bash
# Prepare the wheels gpu_check.sh needs on a GPU machine that has torch but no package index:
#
#     pipelines/bench/gpu_wheels.sh DIR         # on a machine with a package index (this one)
#     pipelines/bench/gpu_check.sh --wheels DIR # there: installs DIR's wheels with --no-index first
#
# DIR gets: the project's own wheel (pip wheel --no-deps .), a wheel of every package the project
# and pytest need beyond torch (open_clip_torch, ftfy, timm, pydensecrf2, pycocotools, typer, ...,
# at the versions installed in this environment, each fetched or built with `pip download` /
# `pip wheel --no-deps`), and requirements.txt listing them. Nothing of torch: torch, torchvision
# and everything they depend on (nvidia-*, triton, numpy, pillow, sympy, ...) are the GPU
# machine's own. Wheels with compiled code are for this Python (its version and platform); the
# GPU machine's Python must match (gpu_check.sh --wheels says so when pip refuses one).
#
# Size: about 100 MB in all, 64 MB of it opencv-python-headless; where the GPU machine has OpenCV
# (gpu_check.sh's import check names cv2 when it has not), leave it out for a ~37 MB folder:
#
#     pipelines/bench/gpu_wheels.sh DIR --leave-out opencv-python-headless
#
# Environment: PYTHON (default: .venv/bin/python when present), the environment whose installed
# versions are taken.
set -euo pipefail
usage() { echo "usage: gpu_wheels.sh DIR [--leave-out NAME,NAME]  (see the comment at the top)" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
DIR=$1
shift
LEAVE=
while [ $# -gt 0 ]; do
  case "$1" in
    --leave-out) [ $# -ge 2 ] || usage; LEAVE=$2; shift ;;
    *) usage ;;
  esac
  shift
done
cd "$(dirname "$0")/../.."
ROOT=$PWD
. pipelines/bench/find_python.sh gpu_wheels.sh "the project's environment: run 'make setup' (builds .venv) or set PYTHON=/path/to/python"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
# name==version of every distribution the project (and pytest) pulls in, minus torch's own closure
"$PY" - "$DIR/requirements.txt" "$LEAVE" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.markers import Marker
from packaging.requirements import Requirement


def requires(name):
    out = []
    for text in md.distribution(name).requires or []:
        r = Requirement(text)
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        out.append(r.name)
    return out


def closure(roots, stop=()):
    seen = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen or key in stop:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels.sh: {name} is not installed in {sys.executable}; install the project "
                             "with its dev extra (make setup) first")
        seen[key] = dist.version
        todo += requires(name)
    return seen


torch = closure(["torch", "torchvision"])
ours = closure([*requires("clip_es"), "pytest"], stop=torch)
ours.pop("clip-es", None)
for name in filter(None, sys.argv[2].split(",")):
    key = re.sub(r"[-_.]+", "-", name).lower()
    if ours.pop(key, None) is None:
        raise SystemExit(f"gpu_wheels.sh: --leave-out {name}: not among the packages: {', '.join(sorted(ours))}")
with open(sys.argv[1], "w") as f:
    f.writelines(f"{k}=={v}\n" for k, v in sorted(ours.items()))
print(f"gpu_wheels: {len(ours)} packages beyond torch ({len(torch)} of torch's left to the GPU machine)")
EOF
# binary wheels where the index has them, else built here (pydensecrf2 ships as an sdist)
"$PY" -m pip wheel -q --no-deps -w "$DIR" -r "$DIR/requirements.txt"
had_build=0; [ -e "$ROOT/build" ] && had_build=1
had_egg=0; [ -e "$ROOT/clip_es.egg-info" ] && had_egg=1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$ROOT"
[ "$had_build" = 1 ] || rm -rf "$ROOT/build"  # only what this build made
[ "$had_egg" = 1 ] || rm -rf "$ROOT/clip_es.egg-info"
n=$(ls "$DIR"/*.whl | wc -l)
mb=$(du -sm "$DIR" | cut -f1)
echo "gpu_wheels: $n wheels, $mb MB in $DIR"
[ "$mb" -le 60 ] || echo "gpu_wheels: note: more than 60 MB" >&2
