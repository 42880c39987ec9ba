# Shared shell helpers, sourced by perf/demo.sh and tests/run.sh: make sure
# the local services of this kind of machine answer (MariaDB 127.0.0.1:3306
# root/no password, Redis 6379, RabbitMQ 5672), starting any that is down
# with the command the machine uses at boot, and find or install the
# OpenSearch-compatible test server osmem-server (PyPI).

mysql_up() { mysql -uroot -h127.0.0.1 -e 'select 1' >/dev/null 2>&1; }
redis_up() { [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]; }
tcp_up() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_up SECONDS WHAT COMMAND...: polls COMMAND every 0.25 s.
wait_up() {
  local secs=$1 what=$2
  shift 2
  for _ in $(seq 1 $((secs * 4))); do "$@" && return 0; sleep 0.25; done
  echo "error: $what did not come up within ${secs}s" >&2
  return 1
}

ensure_services() {
  if mysql_up; then echo "MariaDB: up"; else
    echo "MariaDB: down, starting it"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_up 60 MariaDB mysql_up
  fi
  if redis_up; then echo "Redis: up"; else
    echo "Redis: down, starting it"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_up 30 Redis redis_up
  fi
  if tcp_up 127.0.0.1 5672; then echo "RabbitMQ: up"; else
    echo "RabbitMQ: down, starting it"
    rabbitmq-server -detached
    rabbitmqctl -q -t 120 await_startup
    wait_up 30 RabbitMQ tcp_up 127.0.0.1 5672
  fi
}

# Prints the osmem-server binary: $OSMEM_SERVER_BIN, else the one bundled
# with the PyPI package (it has no console script on PATH).
osmem_bin() {
  if [[ -n "${OSMEM_SERVER_BIN:-}" && -x "$OSMEM_SERVER_BIN" ]]; then
    echo "$OSMEM_SERVER_BIN"
  else
    python3 -c 'import osmem_server; print(osmem_server.resolve_binary())' 2>/dev/null
  fi
}

ensure_osmem_installed() {
  if ! osmem_bin >/dev/null; then
    echo "installing osmem-server (pip)"
    python3 -m pip install --quiet --disable-pip-version-check osmem-server
  fi
  osmem_bin >/dev/null
}
