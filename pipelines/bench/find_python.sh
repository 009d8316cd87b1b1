# Sourced by gpu_check.sh and gpu_wheels.sh from the repository root: sets PY to the project's
# Python ($PYTHON when set, else .venv/bin/python), or prints "$1: needs ...$2" and exits 2.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=$PWD/.venv/bin/python
else
  echo "$1: needs $2" >&2
  exit 2
fi
