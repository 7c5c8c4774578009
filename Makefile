# Shortcuts for the scripts the README names; each script runs the idempotent set-up itself.
.PHONY: setup test serve demo bench

setup:
	scripts/setup.sh

test:
	scripts/test.sh

serve:
	scripts/serve-local.sh

demo: setup
	.venv/bin/xdpturn-lab demo

bench: setup
	.venv/bin/xdpturn-lab bench
