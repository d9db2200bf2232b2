#!/usr/bin/env bash
# Builds trainmesh's container images on this machine, with nothing pulled:
#
#   trainmesh/{job-service,scheduler-service,metrics-service,
#              diagnosis-service,runner,trainctl}:VERSION (and :latest)
#   trainmesh/postgres:15   (for the compose mesh)
#   trainmesh/busybox:1     (a job image to try the compose mesh with)
#
# Usage: scripts/images.sh [--profile release|dev]
#
# The service images come from deploy/Dockerfile, the file a user with a
# registry builds from source. Here, where no image can be pulled:
# - the binaries are built by cargo on the host (--profile dev reuses a
#   debug build, as CI does), stripped, and imported as an image that
#   holds them in /out; the Dockerfile's build stage is dropped, because
#   the engine's legacy builder builds every stage before the target;
# - its base, debian:bookworm-slim, is made from the host's Debian
#   packages (libc6, libgcc-s1, base-files, ca-certificates) when no image
#   of that name exists yet;
# - trainmesh/postgres:15 is made from the host's postgresql-15 package,
#   the libraries it links and busybox-static for its entrypoint script.
#
# Set TRAINMESH_IMAGE_REBUILD_BASE=1 to rebuild the two bases.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

PROFILE=release
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE=${2:?--profile needs release or dev}; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in
  release) PROFILE_DIR=release ;;
  dev|debug) PROFILE=dev; PROFILE_DIR=debug ;;
  *) echo "--profile must be release or dev, not $PROFILE" >&2; exit 2 ;;
esac

BINARIES=(job-service scheduler-service metrics-service diagnosis-service runner trainctl)
BASE_IMAGE=debian:bookworm-slim
PG_IMAGE=trainmesh/postgres:15
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then REVISION="$REVISION-dirty"; fi
SOURCE=$(git remote get-url origin 2>/dev/null || echo unknown)
WORK="$REPO_ROOT/target/images"
export DOCKER_BUILDKIT=0

log() { printf '\033[1mimages:\033[0m %s\n' "$*"; }

# Copies the given host paths (files or symlinks; directories are skipped,
# their files must be listed) into the root filesystem $1, keeping the
# merged-/usr layout of the host.
add_paths() {
  local root=$1
  shift
  printf '%s\n' "$@" | sed 's|^/||' | sort -u |
    tar -C / --no-recursion -cf - -T - | tar -C "$root" --keep-directory-symlink -xf -
}

# The files of installed Debian packages, without documentation.
package_files() {
  dpkg -L "$@" | grep -vE '^/usr/share/(doc|man|lintian|locale)/' |
    while read -r f; do if [[ -f "$f" || -L "$f" ]]; then echo "$f"; fi; done
}

# Every shared library the given ELF files load, and the paths they reach
# through symlinks.
library_closure() {
  ldd "$@" 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | sort -u |
    while read -r lib; do echo "$lib"; readlink -f "$lib"; done
}

new_rootfs() {
  local root=$1
  rm -rf "$root"
  mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,run,tmp,var/tmp}
  ln -s usr/bin "$root/bin"
  ln -s usr/sbin "$root/sbin"
  ln -s usr/lib "$root/lib"
  ln -s usr/lib64 "$root/lib64"
  chmod 1777 "$root/tmp" "$root/var/tmp"
}

build_base() {
  if [[ "${TRAINMESH_IMAGE_REBUILD_BASE:-}" != 1 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE present"
    return
  fi
  log "making $BASE_IMAGE from this machine's Debian packages"
  local root="$WORK/base-rootfs"
  new_rootfs "$root"
  # shellcheck disable=SC2046 # one path per word
  add_paths "$root" $(package_files libc6 libgcc-s1 base-files) /etc/ssl/certs/ca-certificates.crt
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
  tar -C "$root" -cf - . | docker import \
    --change 'LABEL org.opencontainers.image.description="libc6, libgcc-s1, base-files and CA certificates from Debian bookworm, imported locally"' \
    - "$BASE_IMAGE" >/dev/null
}

build_postgres() {
  if [[ "${TRAINMESH_IMAGE_REBUILD_BASE:-}" != 1 ]] && docker image inspect "$PG_IMAGE" >/dev/null 2>&1; then
    log "$PG_IMAGE present"
    return
  fi
  if [[ ! -x /usr/lib/postgresql/15/bin/postgres || ! -x /bin/busybox ]]; then
    echo "$PG_IMAGE needs Debian's postgresql-15 and busybox-static on this machine" >&2
    return 1
  fi
  log "making $PG_IMAGE from this machine's postgresql-15 package"
  local root="$WORK/postgres-rootfs"
  new_rootfs "$root"
  local files elves
  # tzdata: Debian's PostgreSQL reads the system's time zone files.
  # Without the JIT (and the 100 MB LLVM it links): the entrypoint turns
  # it off.
  mapfile -t files < <(package_files postgresql-15 libc6 libgcc-s1 base-files tzdata | grep -v llvmjit)
  mapfile -t elves < <(find /usr/lib/postgresql/15 -type f \( -perm -u+x -o -name '*.so' \) ! -name 'llvmjit*')
  # shellcheck disable=SC2046 # one path per word
  add_paths "$root" "${files[@]}" $(library_closure "${elves[@]}")
  # pg_isready, for health checks, as the official image has it.
  add_paths "$root" /usr/lib/postgresql/15/bin/pg_isready
  ln -s ../lib/postgresql/15/bin/pg_isready "$root/usr/bin/pg_isready"
  cp /bin/busybox "$root/usr/bin/busybox"
  for applet in sh mkdir chmod rm mktemp printf cat; do ln -sf busybox "$root/usr/bin/$applet"; done
  mkdir -p "$root/usr/local/bin"
  install -m 0755 deploy/postgres/entrypoint.sh "$root/usr/local/bin/docker-entrypoint.sh"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
postgres:x:999:
EOF
  # /var/run is base-files' absolute link to /run: create inside the root
  # (never through the link, which would reach this machine's /run).
  mkdir -p "$root/var/lib/postgresql/data" "$root/run/postgresql" "$root/run/lock" \
    "$root/docker-entrypoint-initdb.d"
  chown -R 999:999 "$root/var/lib/postgresql" "$root/run/postgresql"
  tar -C "$root" -cf - . | docker import \
    --change 'USER 999:999' \
    --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change 'ENV TZ=UTC' \
    --change 'EXPOSE 5432' \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    --change 'LABEL org.opencontainers.image.description="PostgreSQL 15 from Debian bookworm, imported locally"' \
    - "$PG_IMAGE" >/dev/null
}

# A job image for trying the mesh on a machine that can pull none:
# busybox-static with a link per applet.
build_busybox() {
  local image=trainmesh/busybox:1
  if [[ "${TRAINMESH_IMAGE_REBUILD_BASE:-}" != 1 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image present"
    return
  fi
  if [[ ! -x /bin/busybox ]]; then
    echo "$image needs Debian's busybox-static on this machine" >&2
    return 1
  fi
  log "making $image from this machine's busybox-static"
  local root="$WORK/busybox-rootfs"
  new_rootfs "$root"
  cp /bin/busybox "$root/usr/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$root/usr/bin/$applet"
  done
  tar -C "$root" -cf - . | docker import --change 'CMD ["/bin/sh"]' - "$image" >/dev/null
}

build_binaries() {
  local stage="$WORK/binaries"
  if [[ "$PROFILE" == release ]]; then
    log "cargo build --release"
    local packages=()
    for b in "${BINARIES[@]}"; do packages+=(-p "$b"); done
    cargo build --release --locked "${packages[@]}"
  fi
  rm -rf "$stage"
  mkdir -p "$stage/out" "$stage/empty"
  for b in "${BINARIES[@]}"; do
    local bin="target/$PROFILE_DIR/$b"
    if [[ ! -x "$bin" ]]; then
      echo "$bin is missing: run cargo build first (profile $PROFILE)" >&2
      return 1
    fi
    strip -o "$stage/out/$b" "$bin"
  done
  tar -C "$stage" -cf - out empty | docker import - trainmesh/binaries:build >/dev/null
}

build_service_images() {
  local dockerfile="$WORK/Dockerfile"
  sed '/^# --- build stage: begin ---$/,/^# --- build stage: end ---$/d' deploy/Dockerfile >"$dockerfile"
  local context="$WORK/context"
  rm -rf "$context"
  mkdir -p "$context"
  for b in "${BINARIES[@]}"; do
    log "trainmesh/$b:$VERSION"
    # The legacy builder's deprecation notice is the only thing it prints
    # on stderr when all goes well.
    docker build --quiet -f "$dockerfile" --target "$b" \
      --build-arg BINARIES=trainmesh/binaries:build \
      --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
      --build-arg SOURCE="$SOURCE" \
      -t "trainmesh/$b:$VERSION" -t "trainmesh/$b:latest" "$context" \
      2> >(grep -vE 'DEPRECATED|BuildKit|environment-variable|^$' >&2) >/dev/null
  done
}

mkdir -p "$WORK"
build_base
build_postgres
build_busybox
build_binaries
build_service_images
docker image rm trainmesh/binaries:build >/dev/null 2>&1 || true
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(trainmesh/|debian:bookworm-slim)' | grep -v ':latest' | sort
