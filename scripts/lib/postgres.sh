# Sourced by scripts/test.sh (and usable by any test script): a throwaway PostgreSQL server for
# the tests, from Debian's server binaries (/usr/lib/postgresql/15/bin; scripts/install-test-tools.sh
# installs them).
#
#   . scripts/lib/postgres.sh
#   test_postgres_start    # initdb into a new mktemp dir, start on 127.0.0.1:<free port>, create
#                          # databases oats_test and oats_test2, export the URLs below
#   test_postgres_stop     # stop the server and remove its directory (idempotent): call it from
#                          # your EXIT trap
#
# Exports:
#   OATS_TEST_DATABASE_URL   postgres://oats:<password>@127.0.0.1:<port>/oats_test
#   OATS_TEST_DATABASE_URL2  postgres://oats:<password>@127.0.0.1:<port>/oats_test2
# The role `oats` is the server's superuser (it may create and drop more databases). TCP
# connections use scram-sha-256 password auth; the server listens on 127.0.0.1 only. The data
# directory is disposable, so durability is off (fsync, synchronous_commit, full_page_writes).
#
# postgres refuses to run as root: as root, the server runs as the OS user ${OATS_PG_OS_USER:-oats-test}
# (created as a system user without a home or shell if missing; `nobody` if that cannot be
# done), via runuser. A watchdog stops the server if the shell that started it dies without
# running its EXIT trap.
#
# Knobs: OATS_PG_BIN (directory with initdb/pg_ctl/postgres/psql), OATS_PG_OS_USER.

_tpg_log() { echo "test-postgres: $*" >&2; }

# The server binaries: $OATS_PG_BIN, else Debian's 15, else the newest Debian major.
test_postgres_bindir() {
  local d
  for d in ${OATS_PG_BIN:-} /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && [ -x "$d/psql" ]; then
      echo "$d"; return 0
    fi
  done
  return 1
}

# The OS user that runs the server: ourselves, unless we are root.
_tpg_os_user() {
  if [ "$(id -u)" -ne 0 ]; then id -un; return 0; fi
  local u=${OATS_PG_OS_USER:-oats-test}
  if ! id -u "$u" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      --comment "OATS throwaway test PostgreSQL" "$u" >/dev/null 2>&1 || true
  fi
  if id -u "$u" >/dev/null 2>&1 && [ "$(id -u "$u")" -ne 0 ]; then echo "$u"; else echo nobody; fi
}

# _tpg_as <command...>: run as the server's OS user, in the server's directory.
_tpg_as() {
  if [ "$_TPG_OS_USER" = "$(id -un)" ]; then
    (cd "$_TPG_DIR" && "$@")
  elif command -v runuser >/dev/null; then
    (cd "$_TPG_DIR" && runuser -u "$_TPG_OS_USER" -- "$@")
  else
    (cd "$_TPG_DIR" && su -s /bin/sh "$_TPG_OS_USER" -c "$(printf '%q ' "$@")")
  fi
}

# A free TCP port on 127.0.0.1 (the kernel's choice; the caller retries if it is taken meanwhile).
_tpg_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

test_postgres_start() {
  local bin pw port i
  if [ -n "${_TPG_DIR:-}" ]; then _tpg_log "already started ($OATS_TEST_DATABASE_URL)"; return 0; fi
  bin=$(test_postgres_bindir) || {
    _tpg_log "ERROR: no PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) under /usr/lib/postgresql/*/bin; run scripts/install-test-tools.sh (Debian package postgresql)"
    return 1
  }
  _TPG_BIN=$bin
  _TPG_OS_USER=$(_tpg_os_user)
  _TPG_DIR=$(mktemp -d /tmp/oats-pg.XXXXXX)
  chmod 700 "$_TPG_DIR"
  pw=$(openssl rand -hex 16)
  printf '%s\n' "$pw" >"$_TPG_DIR/pwfile"
  chmod 600 "$_TPG_DIR/pwfile"
  chown -R "$_TPG_OS_USER" "$_TPG_DIR"

  if ! _tpg_as "$bin/initdb" -D "$_TPG_DIR/data" -U oats --pwfile="$_TPG_DIR/pwfile" \
      --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-locale --no-sync \
      >"$_TPG_DIR/initdb.log" 2>&1; then
    cat "$_TPG_DIR/initdb.log" >&2
    _tpg_log "ERROR: initdb failed (as OS user $_TPG_OS_USER)"
    test_postgres_stop
    return 1
  fi
  rm -f "$_TPG_DIR/pwfile"
  cat >>"$_TPG_DIR/data/postgresql.conf" <<EOF

# scripts/lib/postgres.sh: a throwaway server for the tests
listen_addresses = '127.0.0.1'
unix_socket_directories = '$_TPG_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF

  for i in 1 2 3 4 5; do
    port=$(_tpg_free_port)
    if _tpg_as "$bin/pg_ctl" -D "$_TPG_DIR/data" -l "$_TPG_DIR/postgres.log" -w -t 60 \
        -o "-p $port" start >/dev/null 2>&1; then
      _TPG_PORT=$port
      break
    fi
    _tpg_log "start on port $port failed (attempt $i); log tail:"
    tail -n 5 "$_TPG_DIR/postgres.log" >&2 2>/dev/null || true
  done
  if [ -z "${_TPG_PORT:-}" ]; then
    _tpg_log "ERROR: the server did not start; see above"
    test_postgres_stop
    return 1
  fi

  if ! PGPASSWORD=$pw PGCONNECT_TIMEOUT=10 "$bin/psql" -X -q -h 127.0.0.1 -p "$_TPG_PORT" -U oats -d postgres \
      -v ON_ERROR_STOP=1 -c 'CREATE DATABASE oats_test' -c 'CREATE DATABASE oats_test2' >&2; then
    _tpg_log "ERROR: could not create the test databases over TCP with the password"
    tail -n 20 "$_TPG_DIR/postgres.log" >&2 2>/dev/null || true
    test_postgres_stop
    return 1
  fi

  # Watchdog: if this shell dies without its EXIT trap (SIGKILL), stop the server anyway.
  local owner=$$ dir=$_TPG_DIR user=$_TPG_OS_USER
  (
    trap '' INT HUP
    while kill -0 "$owner" 2>/dev/null && [ -d "$dir/data" ]; do sleep 2; done
    if [ -f "$dir/data/postmaster.pid" ]; then
      _TPG_DIR=$dir _TPG_OS_USER=$user _tpg_as "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop || true
      rm -rf "$dir"
    fi
  ) </dev/null >/dev/null 2>&1 &
  _TPG_WATCHDOG=$!

  OATS_TEST_DATABASE_URL="postgres://oats:$pw@127.0.0.1:$_TPG_PORT/oats_test"
  OATS_TEST_DATABASE_URL2="postgres://oats:$pw@127.0.0.1:$_TPG_PORT/oats_test2"
  export OATS_TEST_DATABASE_URL OATS_TEST_DATABASE_URL2
  _tpg_log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$_TPG_PORT (OS user $_TPG_OS_USER, data in $_TPG_DIR/data); databases oats_test, oats_test2 (OATS_TEST_DATABASE_URL, OATS_TEST_DATABASE_URL2)"
}

test_postgres_stop() {
  [ -n "${_TPG_DIR:-}" ] || return 0
  if [ -n "${_TPG_WATCHDOG:-}" ]; then
    kill "$_TPG_WATCHDOG" 2>/dev/null || true
    wait "$_TPG_WATCHDOG" 2>/dev/null || true
  fi
  if [ -f "$_TPG_DIR/data/postmaster.pid" ]; then
    if ! _tpg_as "$_TPG_BIN/pg_ctl" -D "$_TPG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1; then
      local pid
      pid=$(head -n1 "$_TPG_DIR/data/postmaster.pid" 2>/dev/null || true)
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        _tpg_log "pg_ctl stop failed; killing postmaster $pid"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
  fi
  rm -rf "$_TPG_DIR"
  unset _TPG_DIR _TPG_PORT _TPG_WATCHDOG OATS_TEST_DATABASE_URL OATS_TEST_DATABASE_URL2
}
