#!/usr/bin/env bash
# Builds the broker's libFuzzer targets with clang (g++ has no libFuzzer) and runs each for a
# bounded time. Usage: tests/fuzz/run.sh [seconds per target, default 30] [build dir]
# Needs clang and libclang-rt-14-dev (scripts/setup.sh installs them).
set -euo pipefail
secs="${1:-30}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${2:-$root/build/fuzz}"
mkdir -p "$out"
CXX="${CXX_FUZZ:-clang++}"
if ! command -v "$CXX" >/dev/null; then echo "fuzz: $CXX not found (scripts/setup.sh)" >&2; exit 1; fi
cat > "$out/config.hpp" <<'CFG'
#pragma once
CFG
mkdir -p "$out/include/myelin" && cp "$out/config.hpp" "$out/include/myelin/config.hpp"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -I"$root/core/include" -I"$root/broker/include" -I"$root/broker/src" -I"$out/include")
srcs=("$root/broker/src/frame.cpp" "$root/broker/src/wire.cpp" "$root/broker/src/http.cpp"
      "$root/core/src/status.cpp" "$root/core/src/check.cpp" "$root/core/src/log.cpp")
status=0
for t in frames batch handshake http; do
  echo "fuzz: building fuzz_$t"
  "$CXX" "${flags[@]}" "$root/tests/fuzz/fuzz_$t.cpp" "${srcs[@]}" -o "$out/fuzz_$t"
  corpus="$out/corpus_$t"; mkdir -p "$corpus"
  cp -n "$root/tests/fuzz/corpus/"* "$corpus/" 2>/dev/null || true
  echo "fuzz: running fuzz_$t for ${secs}s"
  if ! "$out/fuzz_$t" -max_total_time="$secs" -max_len=70000 -timeout=10 "$corpus" \
       > "$out/fuzz_$t.log" 2>&1; then
    echo "fuzz: fuzz_$t FAILED (see $out/fuzz_$t.log)"; tail -30 "$out/fuzz_$t.log"; status=1
  else
    grep -E '^Done|#[0-9]+.*DONE' "$out/fuzz_$t.log" | tail -1 || true
  fi
done
exit $status
