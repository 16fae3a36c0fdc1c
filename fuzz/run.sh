#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, one after the
# other, on one core. New inputs go to fuzz/work/<target> (not committed);
# the committed seeds in fuzz/corpus/<target> are read only. Exits non-zero
# at the first target that crashes, leaks past the RSS limit or hangs; the
# reproducer is then in fuzz/artifacts/<target>/.
# With FUZZ_RUNS=N in the environment, each target stops after N
# executions or SECONDS, whichever comes first.
#   usage: [FUZZ_RUNS=N] fuzz/run.sh SECONDS [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
# No sanitizer: the parsers are safe Rust (ASan would only halve the
# speed); debug assertions on, so arithmetic overflow is a crash, as in
# the daemon's release build (overflow-checks = true).
flags=(-s none -a)
runs=()
if [ -n "${FUZZ_RUNS:-}" ]; then
    runs=(-runs="$FUZZ_RUNS")
fi
cargo +nightly fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
    mkdir -p "work/$target" "corpus/$target"
    echo "== $target: ${seconds}s"
    # -rss_limit_mb / -malloc_limit_mb: bounded memory is a property too.
    status=0
    cargo +nightly fuzz run "${flags[@]}" "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" "${runs[@]}" -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -timeout=10 -print_final_stats=1 >"work/$target.log" 2>&1 || status=$?
    grep -E '^(stat::|Done |#[0-9]+ +DONE)|panicked|SUMMARY|Test unit written|out-of-memory' \
        "work/$target.log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 30 "work/$target.log" >&2
        echo "fuzz target $target failed: reproducer in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
