# The two commands: `make demo` (set up, then run the demo) and `make test` (set up, then test).
.PHONY: setup demo test bench lint images compose-test

setup:
	bash scripts/setup.sh

# The demo runs against `convsearch up` (data in ./data), started in the background unless a gateway
# already answers on 127.0.0.1:50051, and left running: it ends with the web page's URL to open.
demo: setup
	@if .venv/bin/convsearch health 127.0.0.1:50051 >/dev/null 2>&1; then \
	  echo "using the gateway already running on 127.0.0.1:50051"; \
	else \
	  mkdir -p build; \
	  echo "starting the local stack (convsearch up, data in ./data; log in build/convsearch-up.log) ..."; \
	  nohup .venv/bin/convsearch up --data-dir ./data >build/convsearch-up.log 2>&1 & echo $$! >build/convsearch-up.pid; \
	  until grep -q "all healthy" build/convsearch-up.log; do \
	    kill -0 "$$(cat build/convsearch-up.pid)" 2>/dev/null || { cat build/convsearch-up.log; exit 1; }; \
	    sleep 1; \
	  done; \
	fi
	.venv/bin/convsearch demo
	@echo
	@echo "Explore it in a browser: http://127.0.0.1:8080/"
	@if [ -f build/convsearch-up.pid ] && kill -0 "$$(cat build/convsearch-up.pid)" 2>/dev/null; then \
	  echo "(the services keep running; stop them with: kill $$(cat build/convsearch-up.pid))"; \
	fi

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
