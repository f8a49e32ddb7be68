#!/usr/bin/env bash
# Submit the dblocks main job (python -m coordinator) to a running Ray cluster.
#
# Usage:
#   deploy/submit.sh [HYDRA_OVERRIDES...]
#
#   RAY_ADDRESS      the cluster's dashboard / job server (default http://127.0.0.1:8265)
#   RAY_JOB_ARGS     extra flags for `ray job submit`, e.g. "--no-wait --submission-id dblocks-1"
#   RAY_AUTH_MODE    left as it is; when unset and RAY_ADDRESS is on this machine it is set to
#                    "disabled" (a head started by deploy/local-stack.sh); for a token-auth
#                    cluster set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token).
#
# Examples:
#   eval "$(deploy/local-stack.sh env)"
#   deploy/submit.sh experiment=dit_digits redis.url=$DBLOCKS_REDIS \
#       mlflow.tracking_uri=$DBLOCKS_MLFLOW storage.path=$PWD/outputs/stack/storage
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

if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
  case "$RAY_ADDRESS" in
    http://127.0.0.1:*|http://localhost:*|127.0.0.1:*|localhost:*) export RAY_AUTH_MODE=disabled ;;
  esac
fi

RAY_BIN="$(command -v ray || true)"
if [[ -z "$RAY_BIN" && -x "$ROOT/.venv/bin/ray" ]]; then
  RAY_BIN="$ROOT/.venv/bin/ray"
fi
if [[ -z "$RAY_BIN" ]]; then
  echo "submit.sh: no 'ray' on PATH (activate the venv: source $ROOT/.venv/bin/activate)" >&2
  exit 127
fi

read -r -a EXTRA <<< "${RAY_JOB_ARGS:-}"

echo "submit.sh: ray job submit to $RAY_ADDRESS: python -m coordinator $*" >&2
exec "$RAY_BIN" job submit \
  --address "$RAY_ADDRESS" \
  --working-dir "$ROOT" \
  --runtime-env-json '{"excludes":[".git",".venv","outputs","bench/results","mlruns","*.whl"]}' \
  "${EXTRA[@]}" \
  -- python -m coordinator "$@"
