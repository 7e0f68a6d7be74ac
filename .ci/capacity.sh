#!/usr/bin/env bash
# Reproduce the capacity table in BENCHMARKS.md: build release, start a server pinned to CPU 1, and
# ramp WebRTC sessions from a load generator pinned to CPU 0. Extra arguments go to the generator
# (see `kotodama-loadgen --help`), e.g. .ci/capacity.sh --steps 50,100,150 --hold 20
set -euo pipefail
cd "$(dirname "$0")/.."
source ./.ci/setup.sh
setup_build_deps
apt_install fonts-dejavu-core util-linux
cargo build --release --locked --features loadgen --bin kotodama --bin kotodama-loadgen
mkdir -p target/capacity
cpus=$(nproc)
if [ "$cpus" -ge 2 ]; then
  exec taskset -c 0 target/release/kotodama-loadgen --server-cpus 1 \
    --json target/capacity/loadgen.json --png target/capacity/loadgen.png "$@"
else
  exec target/release/kotodama-loadgen --json target/capacity/loadgen.json --png target/capacity/loadgen.png "$@"
fi
