#!/usr/bin/env bash
# Train on one machine with torchrun: ranks from NPROC (default: GPUs, else 2), the rest are Hydra overrides.
#   jobs/local.sh model.embedding_dim=128 train.epochs=20
#   NPROC=4 jobs/local.sh +experiment=row_wise
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON_BIN" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)
fi
# Every rank must write to the same run directory.
export RECSYS_RUN_ID=${RECSYS_RUN_ID:-$(date +%Y-%m-%d/%H-%M-%S)}
exec "$PYTHON_BIN" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m recsys.train "$@"
