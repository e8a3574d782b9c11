#!/usr/bin/env bash
# make fuzz: runs each libFuzzer target (fuzz/fuzz_targets/) for FUZZ_SECONDS, one after
# the other, and prints one table row per target. Fails when a target finds a crash, a
# hang or runaway memory, and leaves the input that did it in fuzz/artifacts/<target>/.
#
#   FUZZ_SECONDS=60        how long each target runs
#   FUZZ_TARGETS=a,b       which targets (default: all; `cargo fuzz list` names them)
#   FUZZ_TIMEOUT=25        seconds one input may take before it counts as a hang
#   FUZZ_RSS_MB=2048       memory the fuzzer may grow to before it counts as a leak
#   FUZZ_NICE=19           the fuzzer's niceness (it takes a whole core)
#
# New inputs go to fuzz/target/corpus/<target>/ (kept between runs, not committed); the
# committed corpus in fuzz/corpus/<target>/ is only read. Two maintenance modes:
#
#   hack/fuzz.sh --seed    writes the seed-* inputs again from the examples
#   hack/fuzz.sh --corpus  adds to fuzz/corpus/<target>/ the FUZZ_CORPUS_MAX (default 25)
#                          inputs of the last runs that reach the most new coverage
#
# (see docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
hack/install-fuzz.sh
export PATH="$PWD/.tools/bin:$PATH"

if [[ "${1:-}" == "--seed" ]]; then
  exec "$CARGO" test -p bulwark-control-plane --lib fuzzing::seeds -- --ignored
fi

seconds="${FUZZ_SECONDS:-60}"
# --sanitizer none: no nightly toolchain (see docs/fuzzing.md). Debug assertions and
# overflow checks come from fuzz/Cargo.toml's release profile, not from -a, which would
# turn them on for hyper too.
flags=(--sanitizer none)
mapfile -t all < <("$CARGO" fuzz list)
if [[ -n "${FUZZ_TARGETS:-}" ]]; then
  IFS=, read -r -a targets <<<"$FUZZ_TARGETS"
  for t in "${targets[@]}"; do
    if [[ ! " ${all[*]} " == *" $t "* ]]; then
      echo "fuzz: no target $t (targets: ${all[*]})" >&2
      exit 2
    fi
  done
else
  targets=("${all[@]}")
fi

echo "fuzz: building the targets"
nice -n "${FUZZ_NICE:-19}" "$CARGO" fuzz build "${flags[@]}"
bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

if [[ "${1:-}" == "--corpus" ]]; then
  for t in "${targets[@]}"; do
    [[ -d "fuzz/target/corpus/$t" ]] || continue
    out=$(mktemp -d)
    control="fuzz/target/logs/$t.merge"
    mkdir -p fuzz/target/logs
    # An empty first folder: libFuzzer runs every input once and writes each one's
    # coverage features to the control file, which the script picks from.
    nice -n "${FUZZ_NICE:-19}" "$bin/$t" -merge=1 -merge_control_file="$control" \
      "$out" "fuzz/corpus/$t" "fuzz/target/corpus/$t" >"fuzz/target/logs/$t.merge.log" 2>&1
    rm -rf "$out"
    python3 hack/fuzz-corpus.py "$control" "fuzz/corpus/$t" "${FUZZ_CORPUS_MAX:-25}"
  done
  exit 0
fi

# The last value of `key` in a libFuzzer log (its final stats, or its last status line).
stat() { grep -o "$2[: ]*[0-9][0-9]*" "$1" | tail -n1 | grep -o '[0-9]*$' || echo 0; }

rows=()
failed=0
mkdir -p fuzz/target/logs
for t in "${targets[@]}"; do
  work="fuzz/target/corpus/$t"
  log="fuzz/target/logs/$t.log"
  mkdir -p "$work" "fuzz/artifacts/$t"
  dict=()
  [[ -f "fuzz/dict/$t.dict" ]] && dict=(-dict="fuzz/dict/$t.dict")
  echo "fuzz: $t for ${seconds}s (log: $log)"
  start=$SECONDS
  set +e
  # The binary built above, not `cargo fuzz run`: every target of one run fuzzes the
  # same build, even while the tree changes under it.
  nice -n "${FUZZ_NICE:-19}" "$bin/$t" "$work" "fuzz/corpus/$t" \
    -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$seconds" -timeout="${FUZZ_TIMEOUT:-25}" \
    -rss_limit_mb="${FUZZ_RSS_MB:-2048}" -print_final_stats=1 "${dict[@]}" >"$log" 2>&1
  code=$?
  set -e
  took=$((SECONDS - start))
  runs=$(stat "$log" 'stat::number_of_executed_units')
  if [[ "$runs" == 0 ]]; then
    # No final stats (the fuzzer was stopped): its last status line's count.
    runs=$(grep -o '^#[0-9]*' "$log" | tail -n1 | tr -d '#' || true)
  fi
  rate=$(stat "$log" 'stat::average_exec_per_sec')
  new=$(stat "$log" 'stat::new_units_added')
  cov=$(stat "$log" 'cov')
  if [[ $code == 0 ]]; then
    result=ok
  else
    failed=1
    artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n1 | sed 's/Test unit written to //' || true)
    if [[ -z "$artifact" ]] && (( code > 128 )); then
      # No input to blame: something else ended the fuzzer (a kill, the OOM killer).
      artifact="(killed by signal $((code - 128)); see $log)"
    fi
    result="FAILED ${artifact:-(see $log)}"
    grep -m1 -E "panicked at|ERROR: libFuzzer|ALARM|out-of-memory" "$log" | sed "s/^/fuzz: $t: /" >&2 || true
  fi
  rows+=("$(printf '%-16s %12s %6s %8s %6s %6s  %s' "$t" "$runs" "$took" "$rate" "$new" "$cov" "$result")")
done

echo
printf '%-16s %12s %6s %8s %6s %6s  %s\n' target runs seconds exec/s new cov result
printf '%s\n' "${rows[@]}"
if (( failed )); then
  echo
  echo "fuzz: replay an input with: cargo fuzz run ${flags[*]} <target> <file>;"
  echo "fuzz: once fixed, copy it into fuzz/corpus/<target>/ so that make test replays it"
  exit 1
fi
