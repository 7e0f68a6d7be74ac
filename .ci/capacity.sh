#!/usr/bin/env bash
# Reproduce the capacity table in BENCHMARKS.md: build release, start a server pinned to CPU 0, and
# ramp WebRTC sessions from a load generator pinned to CPU 1 until a bound breaks. Extra arguments
# go to the generator (see `kotodama-loadgen --help`), e.g.
#   .ci/capacity.sh --steps 100,150,200,250,300 --hold 15 --every 6 --question-ms 2700 --reply-ms 2200
# (issue 14's profile: a 2.7 s question every 6 s, a 2.2 s reply)
# On a machine shared with other work, CAPACITY_RT=1 runs both at SCHED_RR real-time priority
# (server 20, generator 10; needs root; the kernel's RT throttling still leaves 5 % of each CPU to
# everything else), so the neighbours' load does not show up as lateness.
set -euo pipefail
cd "$(dirname "$0")/.."
source ./.ci/setup.sh
setup_build_deps
apt_install fonts-dejavu-core util-linux
cargo build --release --locked --features loadgen --bin kotodama --bin kotodama-loadgen
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target/capacity"
out=(--json "$target/capacity/loadgen.json" --png "$target/capacity/loadgen.png")
echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$(nproc)" -lt 2 ]; then
  exec "$target/release/kotodama-loadgen" "${out[@]}" "$@"
fi
if [ "${CAPACITY_RT:-0}" = 1 ]; then
  exec chrt -r 10 taskset -c 1 "$target/release/kotodama-loadgen" --server-cpus 0 --server-rt 20 "${out[@]}" "$@"
fi
exec taskset -c 1 "$target/release/kotodama-loadgen" --server-cpus 0 "${out[@]}" "$@"
