# Entry points named in the README. Each runs the idempotent set-up first.
.PHONY: setup test lint serve demo bench clean

setup:
	@scripts/setup.sh

lint: setup
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests
	.venv/bin/mypy

test: setup
	scripts/test.sh

serve: setup
	scripts/serve-local.sh

demo: setup
	.venv/bin/xdpturn demo

bench: setup
	.venv/bin/xdpturn bench

clean:
	$(MAKE) -C src/xdpturn/fastpath/bpf clean
