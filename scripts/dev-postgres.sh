#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for trainmesh's PostgreSQL test suite.
#
# Developer use (prints the export line on stdout, everything else on stderr):
#
#   scripts/dev-postgres.sh                 # start; prints `export TRAINMESH_TEST_POSTGRES_URL=...`
#   eval "$(scripts/dev-postgres.sh)"       # start and export in the current shell
#   scripts/dev-postgres.sh stop [DIR]      # stop it and delete DIR (default: the last one this user started)
#   scripts/dev-postgres.sh status [DIR]
#
# CI use (.ci/run): `source scripts/dev-postgres.sh`, then `trainmesh_pg_start` (exports
# TRAINMESH_TEST_POSTGRES_URL and TRAINMESH_PG_BASE) and `trainmesh_pg_stop` in an EXIT trap.
# Sourcing only defines functions; it does not change the caller's shell options.
#
# The cluster lives in a fresh `mktemp -d /tmp/trainmesh-pg.XXXXXX` directory (data/, the
# unix socket, postgres.log), listens on 127.0.0.1 only, and has one role, trainmesh/trainmesh,
# which is a superuser (the tests CREATE DATABASE per test). No systemd, no pg_ctlcluster.
# When run as root the server runs as the `postgres` user (or `nobody` if there is none).
#
# Settings (environment):
#   TRAINMESH_PG_PORT     port on 127.0.0.1                 (default 55432)
#   TRAINMESH_PG_BINDIR   directory with initdb/pg_ctl/psql  (default: newest /usr/lib/postgresql/*/bin,
#                         else `pg_config --bindir`, else wherever initdb is on PATH)
#   TRAINMESH_PG_USER     OS user to run the server as when root (default postgres, else nobody)
#   TRAINMESH_PG_OPTIONS  extra server options appended to pg_ctl -o, e.g. "-c fsync=off"

TRAINMESH_PG_ROLE=trainmesh
TRAINMESH_PG_PASSWORD=trainmesh
TRAINMESH_PG_LAST_FILE=/tmp/trainmesh-pg.last.$(id -u)

_trainmesh_pg_log() { printf 'dev-postgres: %s\n' "$*" >&2; }

# Prints the directory holding initdb, pg_ctl, postgres and psql.
trainmesh_pg_bindir() {
  local d
  if [[ -n "${TRAINMESH_PG_BINDIR:-}" ]]; then
    printf '%s\n' "$TRAINMESH_PG_BINDIR"
    return 0
  fi
  # Newest Debian/Ubuntu versioned install first (version-sorted, last wins).
  d=$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n 1)
  if [[ -x "$d" ]]; then
    printf '%s\n' "${d%/postgres}"
    return 0
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null) || d=
    if [[ -n "$d" && -x "$d/initdb" ]]; then
      printf '%s\n' "$d"
      return 0
    fi
  fi
  if command -v initdb >/dev/null 2>&1; then
    d=$(command -v initdb)
    printf '%s\n' "${d%/initdb}"
    return 0
  fi
  _trainmesh_pg_log "no PostgreSQL server binaries found (install Debian's 'postgresql' package or set TRAINMESH_PG_BINDIR)"
  return 1
}

# The OS user the server runs as ("" means the current user).
_trainmesh_pg_os_user() {
  if [[ "$(id -u)" -ne 0 ]]; then
    printf '\n'
  elif [[ -n "${TRAINMESH_PG_USER:-}" ]]; then
    printf '%s\n' "$TRAINMESH_PG_USER"
  elif id -u postgres >/dev/null 2>&1; then
    printf 'postgres\n'
  else
    printf 'nobody\n'
  fi
}

# Runs a command as the server's OS user, from DIR (so that no one needs access to the cwd).
_trainmesh_pg_as() {
  local user=$1 dir=$2
  shift 2
  if [[ -z "$user" ]]; then
    (cd "$dir" && "$@")
  elif command -v runuser >/dev/null 2>&1; then
    (cd "$dir" && runuser -u "$user" -- "$@")
  else
    (cd "$dir" && setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups -- "$@")
  fi
}

# trainmesh_pg_start: create and start the cluster; export TRAINMESH_TEST_POSTGRES_URL,
# TRAINMESH_PG_BASE (the temp dir) and TRAINMESH_PG_BINDIR. Returns non-zero on failure
# (and prints the server log if the server did not come up).
trainmesh_pg_start() {
  local port=${TRAINMESH_PG_PORT:-55432}
  local bindir user base url pwfile version
  unset TRAINMESH_PG_BASE # set again below once this call has made its directory
  bindir=$(trainmesh_pg_bindir) || return 1
  user=$(_trainmesh_pg_os_user)
  version=$("$bindir/postgres" --version 2>/dev/null) || version="postgres (unknown version)"

  if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" >/dev/null 2>&1; then
    _trainmesh_pg_log "something already accepts connections on 127.0.0.1:$port;" \
      "stop it (scripts/dev-postgres.sh stop) or set TRAINMESH_PG_PORT"
    return 1
  fi

  base=$(mktemp -d /tmp/trainmesh-pg.XXXXXX) || return 1
  : >"$base/.trainmesh-pg" # marker: trainmesh_pg_stop only deletes directories that have it
  mkdir -p "$base/data" || return 1
  chmod 0755 "$base" || return 1
  chmod 0700 "$base/data" || return 1
  if [[ -n "$user" ]]; then
    chown "$user:" "$base" "$base/data" || return 1
  fi
  export TRAINMESH_PG_BASE=$base
  export TRAINMESH_PG_BINDIR=$bindir
  printf '%s\n' "$base" >"$TRAINMESH_PG_LAST_FILE" 2>/dev/null || true

  pwfile="$base/pwfile"
  printf '%s\n' "$TRAINMESH_PG_PASSWORD" >"$pwfile" || return 1
  if [[ -n "$user" ]]; then chown "$user:" "$pwfile" || return 1; fi
  chmod 0600 "$pwfile" || return 1

  _trainmesh_pg_log "$version, data in $base/data, running as ${user:-$(id -un)}"
  # The bootstrap superuser is the trainmesh role itself; local (socket) connections are
  # trusted, TCP needs the password.
  if ! _trainmesh_pg_as "$user" "$base" "$bindir/initdb" \
    -D "$base/data" -U "$TRAINMESH_PG_ROLE" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C --no-instructions >"$base/initdb.log" 2>&1; then
    cat "$base/initdb.log" >&2
    _trainmesh_pg_log "initdb failed"
    return 1
  fi
  rm -f "$pwfile"

  # max_connections: nextest runs many tests at once, each with its own database and pool.
  if ! _trainmesh_pg_as "$user" "$base" "$bindir/pg_ctl" -D "$base/data" -l "$base/postgres.log" \
    -w -t 60 \
    -o "-p $port -k $base -c listen_addresses=127.0.0.1 -c max_connections=500 ${TRAINMESH_PG_OPTIONS:-}" \
    start >"$base/pg_ctl.log" 2>&1; then
    cat "$base/pg_ctl.log" "$base/postgres.log" >&2 2>/dev/null || true
    _trainmesh_pg_log "pg_ctl start failed"
    return 1
  fi

  url="postgres://$TRAINMESH_PG_ROLE:$TRAINMESH_PG_PASSWORD@127.0.0.1:$port/postgres"
  # Over TCP with the password: exactly what the tests will do.
  if ! "$bindir/psql" "$url" -v ON_ERROR_STOP=1 -Atqc 'select 1' >/dev/null; then
    cat "$base/postgres.log" >&2 2>/dev/null || true
    _trainmesh_pg_log "server started but $url does not accept connections"
    return 1
  fi
  export TRAINMESH_TEST_POSTGRES_URL=$url
  _trainmesh_pg_log "ready on 127.0.0.1:$port"
  return 0
}

# trainmesh_pg_stop [DIR]: stop the cluster in DIR (default $TRAINMESH_PG_BASE) and delete DIR.
trainmesh_pg_stop() {
  local base=${1:-${TRAINMESH_PG_BASE:-}}
  local bindir user
  [[ -n "$base" && -d "$base" ]] || return 0
  if [[ ! -e "$base/.trainmesh-pg" ]]; then
    _trainmesh_pg_log "$base was not made by this script; not touching it"
    return 1
  fi
  bindir=$(trainmesh_pg_bindir) || return 1
  user=$(_trainmesh_pg_os_user)
  if [[ -f "$base/data/postmaster.pid" ]]; then
    _trainmesh_pg_as "$user" "$base" "$bindir/pg_ctl" -D "$base/data" -m fast -w -t 60 stop \
      >/dev/null 2>&1 || _trainmesh_pg_log "pg_ctl stop failed (log: $base/postgres.log)"
  fi
  if [[ -f "$base/data/postmaster.pid" ]]; then
    _trainmesh_pg_log "server in $base still running; leaving the directory"
    return 1
  fi
  rm -rf -- "$base"
  if [[ -f "$TRAINMESH_PG_LAST_FILE" && "$(cat "$TRAINMESH_PG_LAST_FILE" 2>/dev/null)" == "$base" ]]; then
    rm -f "$TRAINMESH_PG_LAST_FILE"
  fi
  _trainmesh_pg_log "stopped and removed $base"
  return 0
}

_trainmesh_pg_main() {
  set -euo pipefail
  local cmd=${1:-start} base
  case "$cmd" in
    start)
      if ! trainmesh_pg_start; then
        trainmesh_pg_stop || true
        return 1
      fi
      printf 'export TRAINMESH_TEST_POSTGRES_URL=%s\n' "$TRAINMESH_TEST_POSTGRES_URL"
      _trainmesh_pg_log "stop with: $0 stop $TRAINMESH_PG_BASE"
      ;;
    stop | status)
      base=${2:-$(cat "$TRAINMESH_PG_LAST_FILE" 2>/dev/null || true)}
      if [[ -z "$base" ]]; then
        _trainmesh_pg_log "no cluster recorded in $TRAINMESH_PG_LAST_FILE; pass its directory"
        return 1
      fi
      if [[ "$cmd" == stop ]]; then
        trainmesh_pg_stop "$base"
      else
        _trainmesh_pg_as "$(_trainmesh_pg_os_user)" "$base" "$(trainmesh_pg_bindir)/pg_ctl" -D "$base/data" status
      fi
      ;;
    -h | --help | help)
      sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2
      ;;
    *)
      _trainmesh_pg_log "unknown command '$cmd' (start, stop [DIR], status [DIR])"
      return 2
      ;;
  esac
}

# Executed (not sourced): run the CLI.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  _trainmesh_pg_main "$@"
fi
