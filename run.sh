#!/usr/bin/env bash
# Quick start, part 1: install what is missing, build, and run the server (http://127.0.0.1:8080).
# Extra arguments go to `kotodama serve`, e.g. ./run.sh --config kotodama.toml
set -euo pipefail
cd "$(dirname "$0")"
source ./.ci/setup.sh
setup_build_deps
exec cargo run --release --locked --bin kotodama -- serve "$@"
