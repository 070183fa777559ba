# The two commands: `make demo` (set up, then run the demo) and `make test` (set up, then test).
.PHONY: setup demo test bench lint images compose-test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/convsearch demo

test: setup
	.venv/bin/python -m pytest -q -m "not gpu and not docker" --durations=10

images:
	bash scripts/docker_daemon.sh
	bash scripts/images.sh

compose-test: setup
	.venv/bin/python -m pytest -q -m docker tests/test_compose.py

bench: setup
	.venv/bin/python bench/extractor_bench.py
	.venv/bin/python bench/index_bench.py
	.venv/bin/python bench/e2e_bench.py
	.venv/bin/python bench/evaluate_bench.py

lint: setup
	.venv/bin/ruff check convsearch services tests bench scripts clients setup.py
