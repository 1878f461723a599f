#!/usr/bin/env bash
# One prepared GPU check of MLB-Seg (see benchmarks/performance/gpu_check.py and docs/benchmarks.md): about 6 minutes
# on one GPU; it runs python -m benchmarks.performance.gpu_check with the repository root on PYTHONPATH.
#   bash benchmarks/performance/gpu_check.sh [--out DIR] [--quick] [other gpu_check.py options]
# writes DIR/gpu_check.json, DIR/gpu_check.md and DIR/gpu_check.log (default DIR: gpu_check_<date>).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
} > "$out/gpu_check.log"
timeout 480 python -m benchmarks.performance.gpu_check --out "$out" "${args[@]}" 2>&1 | tee -a "$out/gpu_check.log"
