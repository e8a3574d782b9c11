#!/usr/bin/env bash
# Installs what `make fuzz` needs: cargo-fuzz, into .tools/bin (from crates.io, built
# with the machine's stable toolchain), and a C++ compiler, which libfuzzer-sys needs to
# build libFuzzer from its sources (g++ from apt-get when root; else say what is missing).
# Idempotent: does nothing when both are there. No nightly toolchain is needed: the
# targets run with `--sanitizer none` (see docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=0.13.2
dest=.tools

if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "install-fuzz: installing g++ (libfuzzer-sys builds libFuzzer from C++)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq g++ >/dev/null
  else
    echo "install-fuzz: no C++ compiler found; install g++ or clang++ (libfuzzer-sys needs one)" >&2
    exit 1
  fi
fi

for bin in "$dest/bin/cargo-fuzz" "$(command -v cargo-fuzz || true)"; do
  if [[ -n "$bin" && -x "$bin" ]] && "$bin" fuzz --version 2>/dev/null | grep -q " $version\$"; then
    exit 0
  fi
done
echo "install-fuzz: installing cargo-fuzz $version into $dest/bin"
cargo install --quiet --locked --root "$dest" --version "$version" cargo-fuzz
