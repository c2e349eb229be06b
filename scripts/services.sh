#!/usr/bin/env bash
# Make sure the local PostgreSQL, Redis and Mosquitto the tests talk to are running: install them from
# Debian's packages if absent, start them if stopped. Used by test.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  echo "services: nothing answers on 127.0.0.1:$1 after 30 s ($2)" >&2; return 1
}

if ! port_open 5432; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "services: starting PostgreSQL $version"
  conf=/etc/postgresql/$version/main
  # Tests connect over TCP as 'postgres' without a password (trust on loopback, as on dev machines).
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$conf/pg_hba.conf"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 PostgreSQL
fi

if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 Redis
fi

if ! port_open 1883; then
  command -v mosquitto >/dev/null || apt_install mosquitto
  echo "services: starting Mosquitto"
  mosquitto -d -c /etc/mosquitto/mosquitto.conf
  wait_port 1883 Mosquitto
fi

# The browser tests drive Debian's Chromium through the PyPI playwright package (no downloads).
[ -x /usr/bin/chromium ] || apt_install chromium
# Chinese text in the cockpits' pages and screenshots (the browser tests render the zh interface).
dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || apt_install fonts-wqy-microhei
