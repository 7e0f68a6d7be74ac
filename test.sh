#!/usr/bin/env bash
# Quick start, part 2: install what is missing, start Redis and PostgreSQL if they are not running,
# and run every test (unit, integration with real WebRTC peers, signaling).
set -euo pipefail
cd "$(dirname "$0")"
source ./.ci/setup.sh
setup_build_deps
setup_test_deps
start_services
setup_test_database
cargo test --workspace --locked "$@"
# The load generator is behind a feature (not in the server binary): keep it compiling.
cargo check --locked --features loadgen --bin kotodama-loadgen
