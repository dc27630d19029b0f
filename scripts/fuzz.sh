#!/usr/bin/env bash
# The fuzzing leg: builds the libFuzzer targets of tests/fuzz in build-fuzz
# (clang 14, ASan + UBSan, coverage; -O1 with asserts on) and runs each for
# a bounded time on a scratch copy of its committed seed corpus
# (tests/fuzz/corpus/<target>/; the committed corpus is never grown here).
# Fails on any crash, leak, timeout, out-of-memory or sanitizer report,
# keeping the input that caused it under build-fuzz/artifacts/<target>/.
# Prints one line per target: executions, coverage, corpus growth.
#
#   scripts/fuzz.sh [TARGET...]      (default: every target)
#
#   MUONPS_FUZZ_SECONDS   seconds per target (default 60)
#   MUONPS_FUZZ_JOBS      targets run at once (default: the number of CPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${MUONPS_FUZZ_SECONDS:-60}
jobs=${MUONPS_FUZZ_JOBS:-$(nproc)}
# Largest input per target: room for the biggest seed and then some.
declare -A max_len=([job_spec_fuzz]=4096 [safetensors_fuzz]=4096 [checkpoint_fuzz]=8192
  [wire_fuzz]=1024)
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(job_spec_fuzz safetensors_fuzz checkpoint_fuzz wire_fuzz)
for t in "${targets[@]}"; do
  if [[ -z ${max_len[$t]:-} ]]; then
    echo "unknown target '$t' (${!max_len[*]})" >&2
    exit 2
  fi
done

start=$SECONDS
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -g1" \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DMUONPS_FUZZ=ON \
  -DMUONPS_BUILD_BENCH=OFF -DMUONPS_CUDA=OFF -DMUONPS_BUILD_TESTS=OFF > /dev/null
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]}"
echo "fuzz targets built in $((SECONDS - start)) s; fuzzing ${seconds} s each, ${jobs} at a time"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
rm -rf build-fuzz/artifacts  # inputs kept by an earlier run

# run_target TARGET: fuzzes TARGET; its log is $scratch/TARGET/log, its exit
# status $scratch/TARGET/rc.
run_target() {
  local t=$1 dir=$scratch/$1
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp -r "tests/fuzz/corpus/$t/." "$dir/corpus/"
  local args=(-max_total_time="$seconds" -max_len="${max_len[$t]}" -timeout=10 -rss_limit_mb=2048
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/")
  [[ -f tests/fuzz/$t.dict ]] && args+=(-dict="tests/fuzz/$t.dict")
  local rc=0
  ASAN_OPTIONS=detect_leaks=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "build-fuzz/tests/fuzz/$t" "${args[@]}" "$dir/corpus" > "$dir/log" 2>&1 || rc=$?
  echo "$rc" > "$dir/rc"
}

running=0
for t in "${targets[@]}"; do
  run_target "$t" &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=()
for t in "${targets[@]}"; do
  dir=$scratch/$t
  rc=$(cat "$dir/rc")
  seeds=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$dir/log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: //p' "$dir/log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log")
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<< "$done_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<< "$done_line")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<< "$done_line")
  # A sanitizer report fails the run even if the process somehow exited 0.
  if [[ $rc -ne 0 ]] || grep -qE '^(SUMMARY|==[0-9]+==ERROR): |runtime error:' "$dir/log"; then
    failed+=("$t")
    echo "$t: FAILED (exit $rc) after ${execs:-?} executions"
    sed -n '/^==[0-9]*==ERROR\|runtime error\|^SUMMARY\|ALARM\|out-of-memory\|Test unit written/,+25p' \
      "$dir/log" | head -60
    mkdir -p "build-fuzz/artifacts/$t"
    for a in "$dir"/artifacts/*; do
      [[ -e $a ]] || continue
      cp "$a" "build-fuzz/artifacts/$t/"
      echo "  input kept: build-fuzz/artifacts/$t/$(basename "$a") ($(stat -c %s "$a") bytes)"
      echo "  hex: $(head -c 512 "$a" | od -An -tx1 -v | tr -d ' \n')"
      echo "  rerun: build-fuzz/tests/fuzz/$t build-fuzz/artifacts/$t/$(basename "$a")"
    done
  else
    echo "$t: ok, ${execs} executions (${rate}/s), coverage ${cov} edges, ${ft} features," \
      "corpus ${seeds} -> ${corp} inputs"
  fi
done
echo "fuzz leg: $((SECONDS - start)) s"
if ((${#failed[@]} > 0)); then
  echo "fuzz leg: FAILED: ${failed[*]}" >&2
  exit 1
fi
