#!/usr/bin/env bash
# Build the Dockerfile's images with buildah, without a Docker daemon or a registry:
#
#   infra/images/build.sh [serve] [train]      # `make images` (both), `make images IMAGES=serve`
#
# Base images (IMAGE_BASE):
#   debian    (default) a local Debian bookworm base (python3 3.11, python3-venv), built once
#             with mmdebstrap from Debian's packages and kept in buildah's store as
#             localhost/polytask-base:bookworm; passed as SERVE_BASE and TRAIN_BASE. The train
#             image then takes the CPU build of torch: the host's pip resolves torch==2.13.0 (on
#             these machines the CPU wheel on disk) into infra/images/build/wheels, mounted into
#             the build as TORCH_FIND_LINKS.
#   registry  the Dockerfile's defaults (python:3.11-slim, nvidia/cuda:13.0.1-cudnn-runtime),
#             pulled from a registry; torch from PyPI (the CUDA build).
# REBUILD_BASE=1 builds the Debian base again (e.g. for Debian's security updates).
#
# Tags are the ones the Dockerfile's header and the manifests name (polytask/serve:0.1.0,
# polytask/train:0.1.0; buildah stores them as localhost/polytask/...). Prints each image's
# size and build time, and fails if the serve image is more than half the train image.
# Needs root (or a rootless buildah set up with subuids), buildah and mmdebstrap.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGETS=("$@")
mkdir -p infra/images/build
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(serve train)
IMAGE_BASE=${IMAGE_BASE:-debian}
BUILD=infra/images/build
LOCAL_BASE=localhost/polytask-base:bookworm
# Debian's python3 (3.11) and venv, ca-certificates for pip's HTTPS (bash and useradd are in
# minbase). Documentation, man pages and locales are left out (dpkg path-exclude).
BASE_PACKAGES=python3,python3-venv,ca-certificates

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool not found (apt-get install -y buildah mmdebstrap)" >&2
    exit 2
  }
done

# The tag of a target, from the Dockerfile's `docker build --target T -t TAG .` lines.
tag_of() {
  sed -n "s/^#.*docker build --target $1 -t \([^ ]*\) \..*/\1/p" Dockerfile | head -n1
}

# "248 MB" (buildah's decimal units) -> bytes.
to_bytes() {
  awk '{ n = $1; u = $2; m = 1
         if (u == "kB") m = 1e3; else if (u == "MB") m = 1e6; else if (u == "GB") m = 1e9
         printf "%.0f\n", n * m }' <<<"$1"
}

size_of() {
  buildah images --format '{{.Size}}' "$1" | head -n1
}

build_debian_base() {
  if [ "${REBUILD_BASE:-0}" != 1 ] && buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
    echo "== base: $LOCAL_BASE (kept; REBUILD_BASE=1 rebuilds it)"
    return
  fi
  echo "== base: $LOCAL_BASE from Debian bookworm (mmdebstrap)"
  local start=$SECONDS tar=$BUILD/base-bookworm.tar ctr
  mkdir -p "$BUILD"
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$tar"
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
  rm -f "$tar"
  echo "   $(size_of "$LOCAL_BASE") in $((SECONDS - start)) s"
}

# torch==2.13.0 as the host's pip resolves it (its config may point at a local CPU build).
torch_wheels() {
  local pip=(python3 -m pip)
  [ -x .venv/bin/pip ] && pip=(.venv/bin/pip)
  mkdir -p "$BUILD/wheels"
  "${pip[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --dest "$BUILD/wheels" torch==2.13.0 >"$BUILD/wheels.log" 2>&1 || {
    cat "$BUILD/wheels.log" >&2
    exit 1
  }
  echo "   torch wheel for the image: $(basename "$(ls "$BUILD"/wheels/torch-2.13.0*.whl | head -n1)")"
}

ARGS=(--isolation chroot --format docker --layers --force-rm)
# pip in the build trusts what the host's pip trusts (a TLS-inspecting proxy's CA, say): the
# host's bundle is mounted for the build only and never copied into an image.
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$HOST_CA" ]; then
  ARGS+=(--volume "$HOST_CA:/run/polytask-build-ca.crt:ro" --build-arg PIP_CERT=/run/polytask-build-ca.crt)
fi
if [ "$IMAGE_BASE" = debian ]; then
  build_debian_base
  ARGS+=(--build-arg "SERVE_BASE=$LOCAL_BASE" --build-arg "TRAIN_BASE=$LOCAL_BASE")
elif [ "$IMAGE_BASE" != registry ]; then
  echo "error: IMAGE_BASE=$IMAGE_BASE: expected debian or registry" >&2
  exit 2
fi

declare -A SIZES
for target in "${TARGETS[@]}"; do
  tag=$(tag_of "$target")
  [ -n "$tag" ] || { echo "error: no target $target in the Dockerfile's header" >&2; exit 2; }
  extra=()
  if [ "$target" = train ] && [ "$IMAGE_BASE" = debian ]; then
    torch_wheels
    extra=(--volume "$PWD/$BUILD/wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
  fi
  echo "== $target: $tag"
  start=$SECONDS
  buildah bud "${ARGS[@]}" "${extra[@]}" --target "$target" --tag "$tag" --file Dockerfile . \
    >"$BUILD/$target.log" 2>&1 || {
    tail -n 40 "$BUILD/$target.log" >&2
    echo "error: building $target failed (log: $BUILD/$target.log)" >&2
    exit 1
  }
  SIZES[$target]=$(size_of "$tag")
  echo "   built in $((SECONDS - start)) s: ${SIZES[$target]} (log: $BUILD/$target.log)"
done

echo "== sizes"
for target in "${TARGETS[@]}"; do
  printf '   %-6s %-24s %s\n' "$target" "$(tag_of "$target")" "${SIZES[$target]}"
done
if [ -n "${SIZES[serve]:-}" ] && [ -n "${SIZES[train]:-}" ]; then
  serve=$(to_bytes "${SIZES[serve]}")
  train=$(to_bytes "${SIZES[train]}")
  echo "   serve / train = $(awk -v s="$serve" -v t="$train" 'BEGIN { printf "%.2f", s / t }')"
  if awk -v s="$serve" -v t="$train" 'BEGIN { exit !(2 * s > t) }'; then
    echo "error: the serve image is more than half the train image" >&2
    exit 1
  fi
fi
