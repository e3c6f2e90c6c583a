#!/usr/bin/env bash
# Convert every checkpoint under SRC_DIR to safetensors under OUT_DIR, mirroring the tree; for cron or CI.
#
#   scripts/convert_batch.sh SRC_DIR OUT_DIR [streammerge convert options, e.g. --max-ram 256MiB]
#
# Outputs already complete are skipped, so rerunning only converts what is new. Each run appends its per-file
# lines (converted / skipped / failed) to $CONVERT_LOG (default OUT_DIR/convert.log) and prints them too. Exit
# status: 0 when nothing failed, 1 when some file failed (the rest are still converted), 2 on usage errors.
# A run that finds another one still working on OUT_DIR leaves it alone and exits 0.
#
# STREAMMERGE selects the command (default: the project's .venv/bin/streammerge, else streammerge on PATH).
set -uo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
src=$1 out=$2
shift 2

here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${STREAMMERGE:-}" ]; then
    read -r -a streammerge <<< "$STREAMMERGE"
elif [ -x "$here/.venv/bin/streammerge" ]; then
    streammerge=("$here/.venv/bin/streammerge")
else
    streammerge=(streammerge)
fi

mkdir -p "$out" || exit 2
log=${CONVERT_LOG:-$out/convert.log}

if command -v flock > /dev/null; then
    exec 9> "$out/.convert.lock"
    if ! flock -n 9; then
        echo "$(date -u +%FT%TZ) another conversion into $out is still running; nothing to do" | tee -a "$log"
        exit 0
    fi
fi

echo "== $(date -u +%FT%TZ) convert $src -> $out" >> "$log"
"${streammerge[@]}" convert "$src" --output "$out" --quiet "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "== $(date -u +%FT%TZ) exit status $status" >> "$log"
exit "$status"
