# wakegate: `make run` and `make test` set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-c test-python setup build system-deps test-deps vm-deps guest bench-parse bench clean

# Debian packages the build needs: venv, a compiler and the Python headers.
system-deps:
	@if ! $(PYTHON) -c "import venv, ensurepip, sysconfig, os; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" 2>/dev/null \
	    || ! command -v cc >/dev/null; then \
	  echo "installing python3-venv python3-dev gcc with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev gcc >/dev/null; \
	fi

$(STAMP): pyproject.toml setup.py
	$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) build

# Build the C extension in place; fail loudly if it does not build or import.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "import proxy._speedups, proxy.http11 as h; assert h.IMPLEMENTATION == 'c', h.IMPLEMENTATION"

run: setup guest
	$(PY) examples/demo.py

# QEMU, busybox and lz4 for the microVM service (config.example.toml's `vm`), from Debian's packages.
VM_PACKAGES := qemu-system-x86 busybox-static lz4
vm-deps:
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v lz4 >/dev/null || [ ! -x /bin/busybox ] \
	    || ! command -v setpriv >/dev/null; then \
	  echo "installing $(VM_PACKAGES) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(VM_PACKAGES) util-linux >/dev/null; \
	fi

# The demo microVM guest (kernel + busybox initramfs) in .cache/guest; nothing of it is committed.
guest: setup vm-deps
	$(PY) -m controller.cli microvm build --cache .cache/guest

# Debian packages the tests use for real: prometheus scrapes wakegate (tests/test_metrics.py);
# wrk, nginx and haproxy run the tiny benchmark (tests/test_bench.py); QEMU, busybox and lz4
# build and boot the microVM guest (tests/test_guest.py); valgrind counts instructions per request
# (bench measure, tests/test_bench.py).
TEST_PACKAGES := prometheus wrk nginx-light haproxy qemu-system-x86 busybox-static lz4 valgrind
test-deps:
	@missing=""; \
	for tool in prometheus wrk nginx haproxy qemu-system-x86_64 lz4 valgrind; do \
	  command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; \
	done; \
	[ -x /bin/busybox ] || missing="$$missing busybox"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; \
	fi

# The whole suite against the C extension, then against the pure-Python twin.
test: setup test-deps guest test-c test-python

test-c:
	$(PY) -m pytest

test-python:
	WAKEGATE_PUREPYTHON=1 $(PY) -m pytest

bench-parse: setup
	$(PY) -m pytest bench/test_parse.py --benchmark-only --benchmark-enable --benchmark-columns=min,median,mean,ops -p no:cacheprovider

bench: setup
	$(PY) -m bench all

clean:
	rm -rf $(VENV) build *.egg-info proxy/*.so .pytest_cache .hypothesis .benchmarks
