#!/usr/bin/env bash
# Coverage-guided fuzzing of the engine (libFuzzer, clang, ASan + UBSan).
#
#   tests/engine/fuzz.sh [SECONDS] [TARGET...]      (default: 20 s, all targets)
#
# Builds the fuzz targets (tests/engine/build.py --fuzzers) and runs each for
# SECONDS, starting from its committed seed corpus and regression inputs.
# New coverage goes into a scratch corpus (build/engine-fuzz/corpus/NAME; to
# keep some of it, merge it into tests/engine/corpus/NAME with -merge=1).
# A crash, hang (-timeout) or sanitizer report is copied into
# tests/engine/regress/NAME/ (commit it with the fix) and the script exits 1.
# Needs: clang and libFuzzer's runtime (Debian: apt-get install clang
# libclang-rt-14-dev).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(ops segment crash)
out=build/engine-fuzz
python3 tests/engine/build.py --out "$out" --fuzzers >/dev/null
status=0
for t in "${targets[@]}"; do
    work="$out/corpus/$t"
    art="$out/artifacts/$t"
    mkdir -p "$work" "$art" "tests/engine/regress/$t"
    rm -f "$art"/*
    echo "== fuzz_$t for ${secs}s"
    if ! "$out/fuzz_$t" -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="$art/" \
            "$work" "tests/engine/corpus/$t" "tests/engine/regress/$t" >"$out/fuzz_$t.log" 2>&1; then
        status=1
        echo "fuzz_$t FAILED; log: $out/fuzz_$t.log"
        grep -E "ERROR|fuzz model|check code|SUMMARY" "$out/fuzz_$t.log" | head -20 || true
        for f in "$art"/*; do
            [ -e "$f" ] || continue
            cp "$f" "tests/engine/regress/$t/"
            echo "new regression input: tests/engine/regress/$t/$(basename "$f")"
        done
    fi
    grep -E "DONE|stat::number_of_executed_units|stat::average_exec_per_sec" "$out/fuzz_$t.log" || true
done
exit $status
