#!/usr/bin/env bash
# Submit the dblocks main job (python -m coordinator) to a running Ray cluster.
#
# Usage:
#   deploy/submit.sh [HYDRA_OVERRIDES...]
#
#   RAY_ADDRESS         the head's dashboard / job server (default http://127.0.0.1:8265)
#   RAY_JOB_ARGS        extra flags for `ray job submit`, e.g. "--no-wait --submission-id dblocks-1"
#   DBLOCKS_JOB_PYTHON  which Python runs the job and its actors (below)
#
# Authentication: the script asks the head which mode it runs (GET /api/authentication_mode,
# public) and sets RAY_AUTH_MODE to match; whatever RAY_AUTH_MODE says here is overridden. A
# head with token auth needs its token on this machine, in the first of RAY_AUTH_TOKEN,
# the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token (print it on the head: `ray get-auth-token`).
#
# Dependencies: the job's runtime_env brings them, whatever Python started the head:
#   head on this machine (its processes are here): the active venv, else this checkout's .venv,
#       runs the entrypoint and every actor (runtime_env py_executable, and PATH for `python`).
#   head elsewhere: the nodes' own `python` (deploy/cluster.yaml and the KubeRay image install
#       dblocks into it).
#   DBLOCKS_JOB_PYTHON=/path/to/python  that interpreter, on every node
#   DBLOCKS_JOB_PYTHON=pip              each node pip-installs torch==2.13.0 and requirements-pins.txt
#       into a virtualenv over its own Python (Ray's `pip` runtime_env; reaches PyPI once per node)
#   DBLOCKS_JOB_PYTHON=cluster          the nodes' own `python`, also for a head on this machine
#
# Examples:
#   ray start --head --dashboard-host=127.0.0.1 && deploy/submit.sh experiment=debug
#   eval "$(deploy/local-stack.sh env)"
#   deploy/submit.sh experiment=dit_digits redis.url=$DBLOCKS_REDIS \
#       mlflow.tracking_uri=$DBLOCKS_MLFLOW storage.path=$DBLOCKS_STORAGE
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh experiment=dit_digits \
#       redis.url=redis://10.0.1.12:6390/0 mlflow.tracking_uri=http://10.0.1.12:5000 \
#       storage.path=s3://my-bucket/dblocks workers.num_gpus=1 'workers.resources={A10G:1}'
#
# The repository root is uploaded as the job's working_dir (cap: 100 MiB; .git, .venv,
# outputs, bench/results, mlruns and wheels are excluded), so the cluster runs this checkout's code.
# The Redis, MLflow and storage locations must be reachable from every node of the cluster:
# the embedded defaults (redis.url=null, mlflow.tracking_uri=null) only suit a one-node cluster.
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
BASE="${RAY_ADDRESS%/}"
[[ "$BASE" == *://* ]] || BASE="http://$BASE"

die() { echo "submit.sh: $*" >&2; exit 1; }

RAY_BIN="$(command -v ray || true)"
if [[ -z "$RAY_BIN" && -x "$ROOT/.venv/bin/ray" ]]; then
  RAY_BIN="$ROOT/.venv/bin/ray"
fi
[[ -n "$RAY_BIN" ]] || { echo "submit.sh: no 'ray' on PATH (make install, or source $ROOT/.venv/bin/activate)" >&2; exit 127; }

# get PATH [TOKEN]: the body of GET $BASE$PATH, then a last line with the HTTP status (000: no answer)
get() {
  local url="$BASE$1" token="${2:-}"
  if command -v curl >/dev/null; then
    curl -sS --max-time 10 ${token:+-H "Authorization: Bearer $token"} -w '\n%{http_code}' "$url" 2>/dev/null \
      || printf '\n000'
  else
    python3 - "$url" "$token" <<'EOF'
import sys, urllib.error, urllib.request
url, token = sys.argv[1:]
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.read().decode(), r.status, sep="\n", end="")
except urllib.error.HTTPError as e:
    print(e.read().decode(), e.code, sep="\n", end="")
except OSError:
    print("", "000", sep="\n", end="")
EOF
  fi
}
status_of() { tail -n 1 <<< "$1"; }
json_str() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }   # the string value of key $1 (one a line)

# --- the head's auth mode --------------------------------------------------------------------
reply="$(get /api/authentication_mode)"
case "$(status_of "$reply")" in
  200) mode="$(json_str authentication_mode <<< "$reply")" ;;
  000) die "no Ray job server answers at $RAY_ADDRESS; start one (ray start --head --dashboard-host=127.0.0.1) or set RAY_ADDRESS" ;;
  *) mode="" ;;   # a Ray without the endpoint (< 2.52): leave RAY_AUTH_MODE as it is
esac
TOKEN=""
case "$mode" in
  token)
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then TOKEN="$RAY_AUTH_TOKEN"
    elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && -r "$RAY_AUTH_TOKEN_PATH" ]]; then TOKEN="$(cat "$RAY_AUTH_TOKEN_PATH")"
    elif [[ -r "$HOME/.ray/auth_token" ]]; then TOKEN="$(cat "$HOME/.ray/auth_token")"
    fi
    TOKEN="$(tr -d '[:space:]' <<< "$TOKEN")"
    [[ -n "$TOKEN" ]] || die "the Ray head at $RAY_ADDRESS uses token auth and this machine has no token; put the head's \`ray get-auth-token\` in RAY_AUTH_TOKEN or ~/.ray/auth_token"
    [[ "$(status_of "$(get /api/version "$TOKEN")")" != 403 ]] \
      || die "the Ray head at $RAY_ADDRESS refuses this machine's token; use the head's \`ray get-auth-token\` (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
    ;;
  disabled) export RAY_AUTH_MODE=disabled ;;
esac

# --- the job's Python --------------------------------------------------------------------------
# Is the head on this machine? Its processes carry its session name (GET /api/version) in
# their command lines; a head behind an SSH tunnel or in another container shows none here.
head_is_here() {
  local session procs
  session="$(get /api/version "$TOKEN" | json_str session_name)"
  [[ -n "$session" ]] || return 1
  if command -v ps >/dev/null; then procs="$(ps -Ao args=)"; else procs="$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ')"; fi
  grep -qF -- "--session-name=$session" <<< "$procs"
}

json_escape() { sed 's/\\/\\\\/g; s/"/\\"/g' <<< "$1"; }

# python_env PY: run the entrypoint (`python` on PATH) and every worker with interpreter PY
python_env() {
  local py="$1" need='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))'
  [[ -x "$py" ]] || die "DBLOCKS_JOB_PYTHON=$py: not an executable"
  "$py" -c "$need" hydra torch mlflow redis pyarrow ray \
    || die "$py lacks dblocks' dependencies (hydra, torch, mlflow, redis, pyarrow, ray); run make install or set DBLOCKS_JOB_PYTHON"
  py="$(json_escape "$py")"
  printf ',"py_executable":"%s","env_vars":{"PATH":"%s:${PATH}"}' "$py" "${py%/*}"
}

pip_env() {
  local pkgs='"torch==2.13.0"' line
  while read -r line; do
    line="${line%%#*}"; line="$(tr -d '[:space:]' <<< "$line")"
    [[ -n "$line" ]] && pkgs+=",\"$(json_escape "$line")\""
  done < "$ROOT/requirements-pins.txt"
  printf ',"pip":{"packages":[%s],"pip_check":false}' "$pkgs"
}

choice="${DBLOCKS_JOB_PYTHON:-}"
if [[ -z "$choice" ]]; then
  choice=cluster
  if head_is_here; then
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then choice="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then choice="$ROOT/.venv/bin/python"
    fi
  fi
fi
case "$choice" in
  cluster) extra_env=""; what="the nodes' own python" ;;
  pip) extra_env="$(pip_env)"; what="a pip runtime_env (requirements-pins.txt)" ;;
  *) extra_env="$(python_env "$choice")"; what="$choice" ;;
esac

RUNTIME_ENV='{"excludes":[".git",".venv","outputs","bench/results","mlruns","*.whl"]'"$extra_env"'}'
read -r -a EXTRA <<< "${RAY_JOB_ARGS:-}"

echo "submit.sh: ray job submit to $RAY_ADDRESS (auth: ${mode:-unknown}, python: $what): python -m coordinator $*" >&2
exec "$RAY_BIN" job submit \
  --address "$RAY_ADDRESS" \
  --working-dir "$ROOT" \
  --runtime-env-json "$RUNTIME_ENV" \
  "${EXTRA[@]}" \
  -- python -m coordinator "$@"
