#!/usr/bin/env bash
# Brings the containerised mesh up on this machine's Docker Engine and waits
# until every service is healthy:
#
#   deploy/compose/up.sh [--no-build] [--profile release|dev]
#
# 1. builds the images (scripts/images.sh) unless --no-build;
# 2. writes deploy/compose/.env once: a random PostgreSQL password, the
#    group of the engine's socket, and the runners' host work directory
#    (deploy/compose/.state/runners);
# 3. docker-compose up -d, then waits for every health check;
# 4. copies the admin token to deploy/compose/.state/admin.token, so
#      TRAINMESH_DATA_DIR=deploy/compose/.state trainctl list
#    talks to the mesh on the default ports.
#
# Stop with: docker-compose -f deploy/compose/docker-compose.yml down
# (add -v to drop the database and the tokens).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
BUILD=1
PROFILE=release
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-build) BUILD=0; shift ;;
    --profile) PROFILE=${2:?--profile needs release or dev}; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

STATE="$HERE/.state"
COMPOSE=(docker-compose -f "$HERE/docker-compose.yml" --project-directory "$HERE")

if [[ $BUILD == 1 ]]; then
  "$REPO_ROOT/scripts/images.sh" --profile "$PROFILE"
fi

mkdir -p "$STATE/runners/runner-1" "$STATE/runners/runner-2"
# The runners run as 65532 and write their attempt directories here.
if [[ "$(id -u)" == 0 ]]; then
  chown 65532:65532 "$STATE/runners/runner-1" "$STATE/runners/runner-2"
else
  chmod 0777 "$STATE/runners/runner-1" "$STATE/runners/runner-2"
fi

if [[ ! -f "$HERE/.env" ]]; then
  umask 077
  {
    echo "POSTGRES_PASSWORD=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    echo "DOCKER_GID=$(stat -c %g /var/run/docker.sock)"
    echo "TRAINMESH_RUNNER_WORK=$STATE/runners"
  } >"$HERE/.env"
  echo "wrote $HERE/.env"
fi

"${COMPOSE[@]}" up -d

# Every long-running service, healthy within the deadline.
deadline=$((SECONDS + 180))
while :; do
  unhealthy=()
  for id in $("${COMPOSE[@]}" ps -q); do
    status=$(docker inspect --format '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
    case "$status" in
      *" healthy" | /*init-secrets*" exited") ;;
      *) unhealthy+=("$status") ;;
    esac
  done
  if [[ ${#unhealthy[@]} -eq 0 ]]; then break; fi
  if ((SECONDS > deadline)); then
    echo "not healthy after 180 s: ${unhealthy[*]}" >&2
    "${COMPOSE[@]}" ps >&2
    exit 1
  fi
  sleep 1
done

init=$("${COMPOSE[@]}" ps -q init-secrets)
umask 077
docker cp "$init:/var/lib/trainmesh/admin.token" "$STATE/admin.token"
"${COMPOSE[@]}" ps
cat <<EOF

The mesh is up. From this machine:
  export TRAINMESH_DATA_DIR=$STATE     # trainctl finds admin.token there
  trainctl submit examples/jobs/compose-hello.yaml --wait
  grpcurl -plaintext -H "authorization: Bearer \$(cat $STATE/admin.token)" 127.0.0.1:50051 list
EOF
