# kotodama — the two commands of the quick start (Debian, as root):
#   make run    install what is missing, build, start the server on http://127.0.0.1:8080
#   make test   install what is missing, start Redis/PostgreSQL if they are not running, run every test
SHELL := /bin/bash
APT_PACKAGES := build-essential cmake pkg-config ca-certificates curl
CARGO ?= cargo

.PHONY: run test deps services bench clippy fmt

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq $$missing; \
	fi
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "no cargo found: installing Debian's rustc/cargo (kotodama needs Rust >= 1.88)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc cargo; }
	@$(CARGO) --version

# Redis and PostgreSQL are used by the storage and multi-node tests; start them when they are
# installed but not running, install them when absent.
services:
	@command -v redis-server >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
	@command -v pg_ctlcluster >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	@pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 || \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -1) main start || true

run: deps
	$(CARGO) run --release --locked --bin kotodama -- serve

test: deps services
	$(CARGO) test --workspace --locked

bench: deps
	$(CARGO) bench -p media --locked

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
