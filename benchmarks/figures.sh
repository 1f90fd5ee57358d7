#!/usr/bin/env bash
# Every figure the README quotes, from the scripts that make them, in one run (not part of
# `make test`; about 40 minutes on a 2-core CPU). Each output goes to runs/figures/NAME.txt under a
# header with the machine, the date and the load, so a figure copied into the README says where it
# came from. Needs runs/demo (make demo).
#     bash benchmarks/figures.sh [NAME ...]    # names: demo_seeds speculative batched_decode
#                                              #        decode_vs_transformers serve_load tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=runs/figures
mkdir -p "$OUT"
[ -f runs/demo/model.safetensors ] || { echo "runs/demo is missing: run make demo first" >&2; exit 2; }
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(demo_seeds speculative batched_decode decode_vs_transformers serve_load tests)

header() {
    echo "# $1 — $(date -u '+%Y-%m-%d %H:%M UTC'), $(getconf _NPROCESSORS_ONLN) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load $(cut -d' ' -f1-3 /proc/loadavg), torch $($PY -c 'import torch; print(torch.__version__)')"
}

for name in "${names[@]}"; do
    case "$name" in
        demo_seeds) cmd=("$PY" benchmarks/demo_seeds.py) ;;
        speculative) cmd=("$PY" benchmarks/speculative.py runs/demo) ;;
        batched_decode) cmd=("$PY" benchmarks/batched_decode.py runs/demo) ;;
        decode_vs_transformers) cmd=("$PY" benchmarks/decode_vs_transformers.py) ;;
        serve_load) cmd=("$PY" benchmarks/serve_load.py runs/demo) ;;
        tests) cmd=(bash -c "start=\$(date +%s); $PY -m pytest -q -p no:cacheprovider | tail -3; echo \"wall: \$(( \$(date +%s) - start )) s\"") ;;
        *) echo "unknown figure $name; names: demo_seeds speculative batched_decode decode_vs_transformers serve_load tests" >&2; exit 2 ;;
    esac
    echo "== $name: ${cmd[*]}"
    { header "${cmd[*]}"; "${cmd[@]}"; } 2>&1 | tee "$OUT/$name.txt"
done
echo "figures in $OUT/"
