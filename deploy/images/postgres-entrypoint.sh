#!/bin/bash
# Entrypoint of shindensen-postgres (postgres.Dockerfile): initialises an
# empty PGDATA once, then runs the server in the foreground, listening on
# every address. Arguments are passed to postgres (e.g. -c max_connections=200).
#
#   POSTGRES_PASSWORD  required on the first start (empty data directory);
#                      afterwards the password stored in the database counts
#                      (change it with ALTER ROLE ... PASSWORD)
#   POSTGRES_USER      superuser to create (default shindensen)
#   POSTGRES_DB        database to create (default: POSTGRES_USER)
set -euo pipefail
PGDATA=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-shindensen}
db=${POSTGRES_DB:-$user}

die() { echo "shindensen-postgres: $*" >&2; exit 1; }
name='^[A-Za-z_][A-Za-z0-9_]{0,62}$'
[[ $user =~ $name ]] || die "POSTGRES_USER '$user' must match $name"
[[ $db =~ $name ]] || die "POSTGRES_DB '$db' must match $name"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ -n "${POSTGRES_PASSWORD:-}" ] \
    || die "$PGDATA holds no database and POSTGRES_PASSWORD is not set; set it to initialise one"
  echo "shindensen-postgres: initialising $PGDATA (user $user, database $db)"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  printf '\n# shindensen-postgres: every TCP client authenticates with its password\nhost all all all scram-sha-256\n' \
    >> "$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    # Single-user mode: no server, no socket, nothing listening yet.
    out=$(printf 'CREATE DATABASE "%s" OWNER "%s"\n' "$db" "$user" \
      | postgres --single -D "$PGDATA" -c log_min_messages=warning postgres 2>&1) \
      || die "CREATE DATABASE $db failed: $out"
    ! grep -q 'ERROR' <<<"$out" || die "CREATE DATABASE $db failed: $out"
  fi
elif [ -n "${POSTGRES_PASSWORD:-}" ]; then
  echo "shindensen-postgres: $PGDATA is initialised; POSTGRES_PASSWORD is not applied again"
fi

unset POSTGRES_PASSWORD
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
