# Shortcuts for the two quick-start scripts and the developer loop.
.PHONY: run test bench clippy fmt
run:
	./run.sh
test:
	./test.sh
bench:
	cargo bench -p media --locked
clippy:
	cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
fmt:
	cargo fmt --all
capacity:
	./.ci/capacity.sh
