#!/usr/bin/env bash
# The GPU numbers the README lacks, in one run of under 8 minutes on one GPU:
#   a  backbone precision: every registry backbone (weights none) in fp32 against autocast,
#      plus the foundation presets in --presets at their own batch size
#   b  cached features against end to end (benchmarks/cached_vs_end_to_end.py, small)
#   c  the full-dataset projection, BreakHis and IDC (benchmarks/scale.py --projection-only);
#      the summary row's gpu_img_per_s feeds `scale.py --gpu-img-per-s` on another machine
#   d  the real jobs at full size (benchmarks/full_scale.py): 7,909 BreakHis images through
#      train cold and warm and extract, 277,524 IDC patches through train; one row a stage
# Prints JSON rows only, each with "section" (a, b, c, d, summary); full logs go to
# <workdir>/logs. Each section has a time limit; one that fails or runs out prints an
# "error" row and the others still run (exit status 1 at the end).
#
#   bash benchmarks/gpu_suite.sh                          # cuda, real sizes
#   bash benchmarks/gpu_suite.sh --device cpu --dry-run   # the same pipeline, small: minutes
# Options: --device D, --dry-run, --workdir DIR, --archs A,B (section a; default: all of
# the registry), --presets P,Q (default phikon,uni,h_optimus_0; none in a dry run).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
export BREAKHIS_TL_OFFLINE="${BREAKHIS_TL_OFFLINE:-1}"  # nothing is downloaded: weights none
device=cuda dry=0 work="" archs="" presets="phikon,uni,h_optimus_0" presets_set=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --workdir) work="$2"; shift 2 ;;
        --archs) archs="$2"; shift 2 ;;
        --presets) presets="$2"; presets_set=1; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
work="${work:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}"
mkdir -p "$work/logs"
# Compute-mode decisions (compute.choose) shared by the sections; a test session's own.
export BREAKHIS_TL_DISPATCH_DIR="${BREAKHIS_TL_DISPATCH_DIR:-$work/dispatch}"
cd "$here"

if [ "$dry" = 1 ]; then  # every section, small: proves the pipeline, measures nothing
    archs="${archs:-mobilenet_v2}"; [ "$presets_set" = 1 ] || presets=""
    a_images=2 a_batch=2 a_rounds=1 a_limit=120
    b_args="--images 16 --epochs 1 --workers 0" b_limit=180
    c_args="--archs mobilenet_v2 --probe-images 2 --compute default" c_limit=120
    d_args="--small" d_limit=420
else  # the limits add up to 470 s; d stops its own commands by --budget before its limit
    a_images=256 a_batch=64 a_rounds=3 a_limit=120
    b_args="--images 256 --epochs 10" b_limit=60
    c_args="--probe-images 64" c_limit=60
    d_args="--budget 215" d_limit=230
fi
failed=0 start=$SECONDS

# section NAME LIMIT_S COMMAND...: run it, keep its log, print its JSON rows tagged.
section() {
    local name="$1" limit="$2" rc=0
    shift 2
    timeout "$limit" "$@" >"$work/logs/$name.log" 2>&1 || rc=$?
    grep '^{' "$work/logs/$name.log" | sed "s/^{/{\"section\": \"$name\", /" || true
    if [ "$rc" != 0 ]; then
        failed=1
        local why="exit status $rc"; [ "$rc" = 124 ] && why="time limit of ${limit} s"
        printf '{"section": "%s", "error": "%s", "log": "%s"}\n' \
            "$name" "$why" "$work/logs/$name.log"
    fi
}

# Section a's program: one process for every backbone (imports paid once). `python -c`
# (not a shell function) so that `timeout` can run it; it imports common.py from here.
a_code=$(cat <<'EOF'
import sys

import torch
from common import autocast_throughput, emit, preset_batch

from breakhis_tl.models.backbones import REGISTRY
from breakhis_tl.features.extract import pick_device

device_name, archs, presets, images, batch, rounds = sys.argv[1:]
device = pick_device(device_name)
names = [a for a in (archs or ",".join(REGISTRY)).split(",") if a]
names += [p for p in presets.split(",") if p]
for arch in names:
    b = preset_batch(arch, int(batch))
    n = max(int(images), b) if arch not in REGISTRY and device.type == "cuda" else int(images)
    emit(autocast_throughput(arch, device, n, min(b, n), int(rounds)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
EOF
)

section a "$a_limit" "$py" -c "$a_code" "$device" "$archs" "$presets" "$a_images" \
    "$a_batch" "$a_rounds"
# c before b: c measures each default backbone's compute mode (compute.choose) into the
# shared dispatch folder, so b's cached run times extraction, not that one-off measurement.
# shellcheck disable=SC2086  # the size arguments are meant to split
section c "$c_limit" "$py" scale.py --projection-only --project breakhis,idc \
    --device "$device" $c_args --workdir "$work/c"
# shellcheck disable=SC2086
section b "$b_limit" "$py" cached_vs_end_to_end.py --device "$device" $b_args \
    --workdir "$work/b"
# shellcheck disable=SC2086
section d "$d_limit" "$py" full_scale.py --device "$device" $d_args --workdir "$work/d"

"$py" - "$work/logs/c.log" "$((SECONDS - start))" "$dry" "$work/logs" <<'EOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
proj = next((r for r in rows if r.get("benchmark") == "scale_projection"), {})
rates = ",".join(f"{r['arch']}={r['images_per_s']}" for r in proj.get("per_arch", []))
print(json.dumps({"section": "summary", "benchmark": "gpu_suite", "device": proj.get("device"),
                  "gpu": proj.get("gpu"), "seconds": int(sys.argv[2]),
                  "dry_run": sys.argv[3] == "1", "gpu_img_per_s": rates, "logs": sys.argv[4]}))
EOF
exit "$failed"
