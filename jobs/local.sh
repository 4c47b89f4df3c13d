#!/usr/bin/env bash
# Train on one machine with torchrun. Ranks: -n/--nproc N or NPROC (default: the number of GPUs,
# else 2 CPU ranks on gloo). Every other argument is a Hydra override passed to recsys.train.
#   jobs/local.sh model.embedding_dim=128 train.epochs=20
#   jobs/local.sh -n 4 +experiment=row_wise
#   NPROC=1 PYTHON_BIN=python3 jobs/local.sh data=movielens data.path=ml-1m
# Environment: NPROC, PYTHON_BIN (default: the active virtualenv / conda env but base, else the repository's
# .venv, else python3), RECSYS_RUN_ID
# (the run directory's name, outputs/<id>; default: the current time), OMP_NUM_THREADS,
# TRAIN_DEVICE (default: cuda when nvidia-smi lists GPUs, so that a GPU machine whose torch
# cannot use them fails with the reason instead of training on the CPU; else auto). An explicit
# train.device=... override wins.
# Relative paths in overrides are relative to the current directory, as with python -m recsys.train.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

NPROC=${NPROC:-}
case "${1:-}" in
  -n|--nproc) [[ $# -ge 2 ]] || usage; NPROC=$2; shift 2 ;;
  --nproc=*) NPROC=${1#--nproc=}; shift ;;
  -h|--help) usage ;;
esac

# The environment the launcher is started in: an active virtualenv or conda env other than base
# (its python3), else the repository's .venv (make install / make install-cuda), else python3 on the PATH.
if [[ -z "${PYTHON_BIN:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" || ( -n "${CONDA_PREFIX:-}" && "${CONDA_DEFAULT_ENV:-base}" != base ) ]]; then
    PYTHON_BIN=$(command -v python3)
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON_BIN=$ROOT/.venv/bin/python
  else PYTHON_BIN=python3; fi
fi
if [[ -z "${TRAIN_DEVICE:-}" ]]; then
  TRAIN_DEVICE=auto
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then TRAIN_DEVICE=cuda; fi
fi
DEVICE_ARGS=()
if [[ " $* " != *" train.device="* ]]; then DEVICE_ARGS=("train.device=$TRAIN_DEVICE"); fi
if [[ -z "$NPROC" ]]; then
  NPROC=$("$PYTHON_BIN" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "jobs/local.sh: NPROC must be a positive number of ranks, got '$NPROC'" >&2
  exit 2
fi

# Every rank must resolve the same run directory (recsys.config.run_id reads RECSYS_RUN_ID).
RECSYS_RUN_ID=${RECSYS_RUN_ID:-$(date +%Y-%m-%d/%H-%M-%S)}
export RECSYS_RUN_ID
# recsys.train is imported from this checkout, whatever the current directory.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON_BIN" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  -m recsys.train ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} "$@"
