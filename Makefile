# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Stamp file: reinstall only when the project's dependency list changes.
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: test audit demo lint typecheck install clean bench-core bench-loop

# The demo needs only the runtime (ml extra); the tests add their tools on top of the same venv.
DEMO_STAMP := $(VENV)/.installed-ml

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned, so nothing later can pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[ml]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) install --quiet -e '.[ml,test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check core app worker trainer densealign tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# One torch thread per process: the tests run app, worker and trainer processes side by side, and on
# a 2-core machine two threads each made torch 20-30x slower than one.
test: export OMP_NUM_THREADS = 1
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# Known vulnerabilities in the installed packages (pip-audit): fails on one; where the vulnerability
# service cannot be reached it prints one WARNING line and passes (why: .ci/audit.py).
AUDIT_SERVICE ?= pypi
audit: $(STAMP)
	$(PY) .ci/audit.py --service $(AUDIT_SERVICE)

# The whole loop on this machine: SQLite, in-process queue, the shipped model on the CPU.
# `make demo ORACLE=faithfulness` adds a programmatic labeller so the loop runs unattended.
ORACLE ?= none
PORT   ?= 8000
# The clock starts before the install, so the demo can say how long a fresh clone took to serve pairs.
demo:
	@DENSEALIGN_DEMO_T0=$$(date +%s) && export DENSEALIGN_DEMO_T0 && \
	$(MAKE) --no-print-directory $(DEMO_STAMP) && \
	$(VENV)/bin/densealign demo --oracle $(ORACLE) --port $(PORT)

bench-loop: $(STAMP)
	$(PY) bench/loop.py

bench-core: $(STAMP)
	$(PY) bench/core.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
