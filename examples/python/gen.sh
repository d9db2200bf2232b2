#!/usr/bin/env bash
# Generate the Python client for every .proto under proto/ into examples/python/gen/
# (git-ignored). Run from anywhere:
#
#   python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
#   PYTHON=.venv/bin/python examples/python/gen.sh
#   .venv/bin/python examples/python/submit_and_watch.py --help
#
# With examples/python/gen on sys.path (submit_and_watch.py adds it itself), imports read
# like the proto packages: `from trainmesh.job.v1 import job_service_pb2_grpc`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=examples/python/gen
PYTHON=${PYTHON:-python3}
cd "$ROOT"

if ! "$PYTHON" -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "gen.sh: grpc_tools is not importable by $PYTHON;" \
    "pip install -r examples/python/requirements.txt (or set PYTHON=...)" >&2
  exit 1
fi

mapfile -t PROTOS < <(find proto -name '*.proto' -type f | LC_ALL=C sort)
if [[ ${#PROTOS[@]} -eq 0 ]]; then
  echo "gen.sh: no .proto files under proto/" >&2
  exit 1
fi

rm -rf "$OUT"
mkdir -p "$OUT"
# grpc_tools.protoc adds its bundled include dir itself, so google/protobuf/*.proto resolve.
"$PYTHON" -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "${PROTOS[@]}"

# Regular packages for every generated directory (trainmesh/, trainmesh/job/, ...).
find "$OUT" -mindepth 1 -type d -exec touch {}/__init__.py \;

echo "generated $(find "$OUT" -name '*_pb2*.py' | wc -l) modules from ${#PROTOS[@]} protos into $OUT"
