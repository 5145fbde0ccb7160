#!/usr/bin/env bash
# Build Encore's images in dependency order, without Compose: the base image first, then every role image
# FROM it. Needs a Docker engine with BuildKit (the default since Docker 23).
#
#   bash infra/docker/build.sh                       # encore/{base,dagster,serving,trainer}:dev, CPU
#   PREFIX=registry.example.com/encore TAG=0.1.0 PUSH=1 bash infra/docker/build.sh
#   GPU=1 bash infra/docker/build.sh                 # also encore/base:<tag>-gpu and encore/trainer:<tag>-gpu
set -euo pipefail
cd "$(dirname "$0")/../.."

PREFIX=${PREFIX:-encore}
TAG=${TAG:-dev}

build() {  # build IMAGE DOCKERFILE [ARGS...]
  local image=$1 dockerfile=$2
  shift 2
  echo "build: $image ($dockerfile)"
  docker build -f "$dockerfile" -t "$image" "$@" .
  if [ "${PUSH:-0}" = 1 ]; then docker push "$image"; fi
}

build "$PREFIX/base:$TAG" infra/docker/base.Dockerfile --build-arg TORCH_FLAVOUR=cpu
for role in dagster serving trainer; do
  build "$PREFIX/$role:$TAG" "infra/docker/$role.Dockerfile" --build-arg BASE_IMAGE="$PREFIX/base:$TAG"
done

if [ "${GPU:-0}" = 1 ]; then
  build "$PREFIX/base:$TAG-gpu" infra/docker/base.Dockerfile --build-arg TORCH_FLAVOUR=gpu
  build "$PREFIX/trainer:$TAG-gpu" infra/docker/trainer.Dockerfile \
    --build-arg BASE_IMAGE="$PREFIX/base:$TAG-gpu" --build-arg TRAIN_BACKEND=nccl
fi
