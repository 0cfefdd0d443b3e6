#!/usr/bin/env bash
# The simulated cohort at 2 mm, end to end, then the ground-truth benchmark on it.
#
# Usage: benchmarks/run_2mm.sh OUT_DIR [group-level options, e.g. --device cuda --n-cpus 16]
#
# The demo's steps at 2 mm, with the participant level run as a cluster would run it
# (JOBS processes at once, default 8, each on a block of subjects):
#   1. brainage-xai-simulate OUT_DIR/bids --resolution 2 (N_SUBJECTS, default 200);
#   2. the participant level, JOBS at once;
#   3. the group level with the demo's options (--rank-grid 2:12 --layer auto
#      --tensor deviations; at 2 mm `--layer auto` takes block2, whose feature voxels are
#      4 mm apart) and the options given here;
#   4. bench_explanations.py on the run (setting names seed0-...), with RANDOM_NETWORKS
#      (default 20) random-weight networks and SHIFT_DRAWS (default 200) draws of the
#      shift null, per-region detail; its numbers go to OUT_DIR/bench_explanations.json.
# RESOLUTION (default 2) runs the same steps at another resolution (4: the demo's).
# Prints the wall time of each step (also in OUT_DIR.times) and the group level's stages
# from its log. The group level resumes where it stopped, so the script can be rerun on
# the same OUT_DIR after a time limit. It needs a GPU (the network trains on
# 99 x 117 x 95 maps): on an H100 training took 1 min, on 2 CPU cores it takes hours.
# PYTHON selects the interpreter (default python3); the package must be importable by it.
set -euo pipefail
out=${1:?usage: benchmarks/run_2mm.sh OUT_DIR [group-level options]}
shift
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
n=${N_SUBJECTS:-200}
jobs=${JOBS:-8}
bids=$out/bids
res=$out/results
resolution=${RESOLUTION:-2}
common=(--resolution "$resolution" --random-seed 0 --quiet --skip-bids-validation)

step() {  # step NAME COMMAND...: run and time one step, stop on failure
    local name=$1 t0 rc=0
    shift
    t0=$(date +%s)
    "$@" || rc=$?
    printf '%-20s %6d s  (exit %d)\n' "$name" "$(($(date +%s) - t0))" "$rc" | tee -a "$out.times"
    return "$rc"
}

participants() {
    seq -f %03g 1 "$n" | xargs -n $(((n + jobs - 1) / jobs)) -P "$jobs" \
        "$py" -m brainage_xai "$bids" "$res" participant "${common[@]}" --participant-label
}

mkdir -p "$out"
: > "$out.times"
"$py" -c 'import torch, brainage_xai; print("brainage-xai", brainage_xai.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
[ -e "$bids/participants.tsv" ] ||
    step simulate "$py" -c 'import sys; from brainage_xai.simulate import main; sys.exit(main())' \
        "$bids" --resolution "$resolution" --n-subjects "$n" --seed 0 --quiet
[ -n "$(ls "$res"/sub-*.html 2>/dev/null)" ] || step participant participants
rc=0
step group "$py" -m brainage_xai "$bids" "$res" group "${common[@]}" \
    --rank-grid 2:12 --layer auto --tensor deviations "$@" || rc=$?
grep -h -E "brainage_xai.(group|selection) (INFO|DEBUG) (stage|training|model:|selection|rank sweep|final|explanations|report)" \
    "$res"/logs/brainage-xai_group_*.log | cut -c12-200 || true
[ "$rc" = 0 ] || exit "$rc"
step bench_explanations "$py" "$here/bench_explanations.py" --run "seed0=$bids:$res" -v \
    --shift-draws "${SHIFT_DRAWS:-200}" --random-networks "${RANDOM_NETWORKS:-20}" \
    --json "$out/bench_explanations.json"
cat "$out.times"
