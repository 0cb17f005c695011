#!/usr/bin/env bash
# Make PostgreSQL and Redis reachable for `make run` (mode: run) or tests and CI (mode: test).
#   test: where they are not running, install them from Debian's packages and start them.
#         Also installs chromium (Debian's package) for the browser tests when it is missing.
#   run:  start the compose services when docker compose is there, else say what to start.
set -euo pipefail
mode=${1:-test}

# host and port of a URL such as postgresql+asyncpg://user@host:5432/db or redis://host:6379/0
host_port() {
  local url=$1 default_port=$2 rest
  rest=${url#*://}; rest=${rest#*@}; rest=${rest%%/*}
  if [[ $rest == *:* ]]; then echo "${rest%%:*} ${rest##*:}"; else echo "$rest $default_port"; fi
}
reachable() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# The console's browser tests (tests/console/test_browser.py) drive Debian's chromium through
# playwright; installed here, before the services check, because it is needed either way.
if [ "$mode" = test ] && ! command -v chromium >/dev/null; then
  echo "installing chromium from Debian's packages (the console's browser tests)"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The Sentinel failover tests (tests/topology) start Debian's redis-sentinel on loopback ports.
if [ "$mode" = test ] && ! command -v redis-sentinel >/dev/null; then
  echo "installing redis-sentinel from Debian's packages (the Sentinel failover tests)"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-sentinel >/dev/null
fi

# tests/pooler start a PgBouncer of their own (own config, own loopback port); the package's
# system service on 6432, if it starts, is never used. Like the two above, installed before the
# services check, which ends the script early when PostgreSQL and Redis already run.
if [ "$mode" = test ] && ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
  echo "installing pgbouncer from Debian's packages (the PgBouncer tests)"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi

read -r pg_host pg_port < <(host_port "${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/contact360}" 5432)
read -r redis_host redis_port < <(host_port "${REDIS_URL:-redis://127.0.0.1:6379/0}" 6379)

missing=()
reachable "$pg_host" "$pg_port" || missing+=(postgresql)
reachable "$redis_host" "$redis_port" || missing+=(redis)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$mode" = run ]; then
  if docker compose version >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    services=(); for m in "${missing[@]}"; do services+=("${m/postgresql/postgres}"); done
    # Compose needs the secrets of its .env (see .env.example) and says which one is missing.
    docker compose up -d --wait "${services[@]}"
    # Its PostgreSQL and Redis require the passwords from .env, which the defaults lack.
    if [ -z "${DATABASE_URL:-}" ] || [ -z "${REDIS_URL:-}" ]; then
      echo "error: started compose ${services[*]} on 127.0.0.1; set DATABASE_URL=postgresql+asyncpg://postgres:PASSWORD@127.0.0.1:5432/contact360 and REDIS_URL=redis://:PASSWORD@127.0.0.1:6379/0 with the passwords from .env, then make run again" >&2
      exit 1
    fi
    exit 0
  fi
  echo "error: ${missing[*]} not reachable at ${pg_host}:${pg_port} / ${redis_host}:${redis_port}: start them (or run 'docker compose up -d postgres redis'), or set DATABASE_URL / REDIS_URL" >&2
  exit 1
fi

# Tests and CI: install from Debian's packages where needed, then start on the standard ports.
need_install=()
command -v pg_ctlcluster >/dev/null || need_install+=(postgresql)
command -v redis-server >/dev/null || need_install+=(redis-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]} from Debian's packages"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
fi
if ! reachable 127.0.0.1 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$version/main
  # Tests connect as postgres without a password over TCP, like the machines they run on.
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"; then
    sudo_ sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf"
  fi
  sudo_ pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
if ! reachable 127.0.0.1 6379; then
  sudo_ mkdir -p /var/lib/redis /var/log/redis
  sudo_ redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
for _ in $(seq 1 30); do
  reachable 127.0.0.1 5432 && reachable 127.0.0.1 6379 && exit 0
  sleep 1
done
echo "error: PostgreSQL or Redis did not come up on 127.0.0.1" >&2
exit 1
