#!/usr/bin/env bash
# Launcher of the trainer image: torchrun with c10d rendezvous, then `python -m models.distributed`.
#
# Environment (defaults in trainer.Dockerfile):
#   NNODES          nodes taking part (containers / pods)                               1
#   NPROC           ranks per node (GPUs per node, or a few CPU processes)               1
#   MASTER          host of the rendezvous store: node 0 (the Job's pod 0 on Kubernetes) 127.0.0.1
#   RDZV_PORT       its port                                                             29400
#   RDZV_ID         one id per training run, the same on every node                      encore-train
#   TRAIN_BACKEND   gloo (CPU) or nccl (GPU)                                             gloo
#   TRAIN_CONFIG    a name under models/configs/ or a YAML path                          default
#   TRAIN_DATA      an events snapshot (Parquet/CSV), or "latest": the newest dataset snapshot the Dagster
#                   training_dataset asset wrote under $ENCORE_DATA_DIR/datasets          latest
#   TRAIN_OUT       where rank 0 saves the trained Recommender (optional)
#   TRAIN_EPOCHS    override the config's epoch count (optional)
#   RDZV_DNS_WAIT_S how long to wait for MASTER to resolve                              300
# Extra arguments are passed on to models.distributed (e.g. --max-steps 100).
set -euo pipefail

data=${TRAIN_DATA:-latest}
if [ "$data" = latest ]; then
  # Every node must read the same snapshot: the data volume is shared, and snapshots are content-addressed.
  data=$(ls -t "${ENCORE_DATA_DIR:-/var/lib/encore}"/datasets/interactions-*.parquet 2>/dev/null | head -n 1 || true)
  if [ -z "$data" ]; then
    echo "encore-train: no snapshot under ${ENCORE_DATA_DIR:-/var/lib/encore}/datasets; run the Dagster" \
         "training_dataset asset first, or set TRAIN_DATA" >&2
    exit 2
  fi
fi

# On Kubernetes the rendezvous host's DNS name (pod 0 behind the headless Service) appears only once that
# pod is scheduled; a node that starts first waits for it instead of failing the whole Job.
master=${MASTER:-127.0.0.1}
for _ in $(seq 1 "${RDZV_DNS_WAIT_S:-300}"); do
  getent hosts "$master" > /dev/null && break
  sleep 1
done
getent hosts "$master" > /dev/null || { echo "encore-train: cannot resolve MASTER=$master" >&2; exit 2; }

# The arguments of models.distributed (tests/test_deploy.py checks each flag against its argparse parser).
args=(--config "${TRAIN_CONFIG:-default}" --data "$data" --backend "${TRAIN_BACKEND:-gloo}")
if [ -n "${TRAIN_OUT:-}" ]; then args+=(--out "$TRAIN_OUT"); fi
if [ -n "${TRAIN_EPOCHS:-}" ]; then args+=(--epochs "$TRAIN_EPOCHS"); fi

echo "encore-train: ${NNODES:-1} node(s) x ${NPROC:-1} rank(s), rendezvous $master:${RDZV_PORT:-29400}," \
     "backend ${TRAIN_BACKEND:-gloo}, data $data"
exec torchrun \
  --nnodes="${NNODES:-1}" \
  --nproc_per_node="${NPROC:-1}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$master:${RDZV_PORT:-29400}" \
  --rdzv_id="${RDZV_ID:-encore-train}" \
  -m models.distributed "${args[@]}" "$@"
