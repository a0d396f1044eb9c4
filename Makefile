# Everything runs inside .venv/ in the repository root, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# UTF-8 text I/O whatever the machine's locale (CI images often run in the C locale)
export PYTHONUTF8 := 1
STAMP  := $(VENV)/.nnssl-installed
# pytest exits 5 when it collected no test; that is a broken suite, not a pass, so it is reported.
PYTEST_ARGS ?=
# pytest-xdist workers (0: everything in this one process). Each test file runs whole on one worker: its module
# fixtures are built once and the Slurm tests share their one cluster; session data is built once per run and
# copied to each worker (tests/conftest.py built_once).
# Files start in the order tests/conftest.py gives them (longest first), not xdist's most-tests-first.
TEST_WORKERS ?= 2

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/nnssl_demo $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
