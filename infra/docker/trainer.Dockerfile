# syntax=docker/dockerfile:1.7
#
# Trainer image: multi-node TorchRec training (models.distributed: DistributedModelParallel, item table
# sharded row-wise across ranks) under torchrun with c10d rendezvous. One container per node; each runs
# $NPROC ranks. See infra/docker/trainer-entrypoint.sh for the variables it reads.
#
#   CPU (gloo):  docker build -f infra/docker/trainer.Dockerfile --build-arg BASE_IMAGE=encore/base:dev -t encore/trainer:dev .
#   GPU (nccl):  docker build -f infra/docker/base.Dockerfile --build-arg TORCH_FLAVOUR=gpu -t encore/base:gpu .
#                docker build -f infra/docker/trainer.Dockerfile --build-arg BASE_IMAGE=encore/base:gpu \
#                  --build-arg TRAIN_BACKEND=nccl -t encore/trainer:gpu .
#
# A CUDA base image is not required: torch's PyPI wheels carry the CUDA runtime, and the driver comes from the
# host (NVIDIA container toolkit / device plugin). To use one anyway, build the base with
# --build-arg PYTHON_IMAGE=<a CUDA image that has python3.11>.

# encore-base is resolved from a named build context in compose (additional_contexts: service:...);
# plain `docker build` passes --build-arg BASE_IMAGE=encore/base:<tag>.
ARG BASE_IMAGE=encore-base
FROM ${BASE_IMAGE}

ARG TRAIN_BACKEND=gloo
# Defaults for a single node; compose and the Kubernetes Job override NNODES, NPROC, MASTER and the data.
ENV TRAIN_BACKEND=${TRAIN_BACKEND} \
    NNODES=1 \
    NPROC=1 \
    MASTER=127.0.0.1 \
    RDZV_PORT=29400 \
    TRAIN_CONFIG=default \
    TRAIN_DATA=latest

COPY --chmod=755 infra/docker/trainer-entrypoint.sh /usr/local/bin/encore-train

# 29400: c10d rendezvous (node 0 hosts the store); the ranks' own collectives use ephemeral ports.
EXPOSE 29400
ENTRYPOINT ["tini", "--", "encore-train"]
