# Both main targets run the whole set-up first (Debian packages, .venv, lockfs).
.PHONY: setup demo test unit lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/pytest -q

unit:
	.venv/bin/pytest -q tests/test_unit_*.py

lint:
	.venv/bin/ruff check src tests bench

bench: setup
	.venv/bin/python bench/run.py

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .ruff_cache
