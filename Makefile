# wakegate: `make run` and `make test` set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: kubernetes docker run test test-c test-python setup build system-deps test-deps vm-deps guest bench-parse bench clean \
	fuzz-deps fuzz-build fuzz-quick fuzz criu wasm

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

run: setup guest criu wasm
	$(PY) examples/demo.py

# The WebAssembly handlers (examples/wasm, tests/wasm) in build/wasm: clang's wasm32-wasi target, from Debian.
wasm: setup
	PY=$(PY) sh deploy/wasm.sh

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
# (bench measure, tests/test_bench.py); systemd's systemd-socket-activate hands wakegate its listeners
# (tests/test_runtime.py); headless chromium shows the waiting page (tests/test_pages.py); curl and openssl
# test TLS (tests/test_tls.py).
TEST_PACKAGES := prometheus wrk nginx-light haproxy qemu-system-x86 busybox-static lz4 valgrind systemd chromium curl openssl
test-deps:
	@missing=""; \
	for tool in prometheus wrk nginx haproxy qemu-system-x86_64 lz4 valgrind systemd-socket-activate chromium curl openssl; do \
	  command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; \
	done; \
	[ -x /bin/busybox ] || missing="$$missing busybox"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; \
	fi

# CRIU >= 4.2 for process snapshots (sleep = "snapshot" on a command service), built from Debian's
# source of a newer suite and cached in /var/cache/wakegate (deploy/criu.sh says why).
criu:
	@deploy/criu.sh >/dev/null

# Debian's Docker Engine for the Docker backend's tests, installed without starting a daemon: the
# tests run their own dockerd on a private socket (deploy/docker.sh says why).
docker:
	@deploy/docker.sh >/dev/null

# A Kubernetes control plane (etcd from Debian; kube-apiserver, -controller-manager, -scheduler, and a
# kubelet for bench k8s, built from Debian's source package) for the Kubernetes node tests, cached in
# /var/cache/wakegate (deploy/kubernetes.sh says why; a fresh machine takes 4-8 minutes, a warm one none).
kubernetes:
	@deploy/kubernetes.sh >/dev/null

# The whole suite against the C extension, then against the pure-Python twin, after a bounded
# fuzz run of the C entry points under AddressSanitizer.
test: setup test-deps criu docker kubernetes wasm guest fuzz-quick test-c test-python

# Fuzzing (tests/fuzz/http11_fuzz.py): the extension built with clang's ASan and libFuzzer
# instrumentation into build/fuzz, driven by atheris with its ASan runtime preloaded. Every input is
# checked against the pure-Python twin and h11. The corpus is scratch space (.cache/fuzz-corpus).
FUZZ_QUICK_RUNS ?= 300000
FUZZ_RUNS ?= 10000000
FUZZ_JOBS ?= 2
FUZZ_ENV = LD_PRELOAD=$$($(PY) -c "import atheris, os; print(os.path.join(os.path.dirname(os.path.dirname(atheris.__file__)), 'asan_with_fuzzer.so'))") \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1
FUZZ_CMD = $(PY) tests/fuzz/http11_fuzz.py .cache/fuzz-corpus -print_final_stats=1 -max_len=4096 \
	-artifact_prefix=build/fuzz/

fuzz-deps: $(STAMP)
	@if ! command -v clang >/dev/null || [ -z "$$(find /usr/lib/llvm-* -name 'libclang_rt.asan_static-x86_64.a' 2>/dev/null)" ]; then \
	  echo "installing clang libclang-rt-14-dev with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    clang libclang-rt-14-dev >/dev/null; \
	fi
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install --quiet atheris

fuzz-build: fuzz-deps
	CC=clang LDSHARED="clang -shared" \
	  CFLAGS="-fsanitize=address,fuzzer-no-link -g -O1 -fno-omit-frame-pointer -Wno-missing-field-initializers" \
	  $(PY) setup.py --quiet build_ext --build-lib build/fuzz --build-temp build/fuzz-tmp 2>&1 | grep -v -i "deprecat" || true
	@test -n "$$(ls build/fuzz/proxy/_speedups*.so)"

fuzz-quick: fuzz-build
	mkdir -p .cache/fuzz-corpus
	@$(FUZZ_ENV) $(FUZZ_CMD) -atheris_runs=$(FUZZ_QUICK_RUNS) -seed=$$(date +%s) \
	  > build/fuzz/quick.log 2>&1; rc=$$?; grep -E "Difference|ERROR|stat::number_of_executed_units|Done" \
	  build/fuzz/quick.log | head -n 8; [ $$rc = 0 ] || { tail -n 40 build/fuzz/quick.log; exit $$rc; }

# The long run: FUZZ_RUNS inputs in all, split over FUZZ_JOBS processes; each prints its final stats.
fuzz: fuzz-build
	mkdir -p .cache/fuzz-corpus
	@start=$$(date +%s); \
	for job in $$(seq $(FUZZ_JOBS)); do \
	  ( $(FUZZ_ENV) $(FUZZ_CMD) -atheris_runs=$$(( $(FUZZ_RUNS) / $(FUZZ_JOBS) )) -seed=$$job \
	      > build/fuzz/job-$$job.log 2>&1; echo $$? > build/fuzz/job-$$job.rc ) & \
	done; wait; \
	status=0; for job in $$(seq $(FUZZ_JOBS)); do \
	  echo "== job $$job: exit $$(cat build/fuzz/job-$$job.rc)"; grep -E "^Done|stat::number_of_executed_units|Difference|ERROR" build/fuzz/job-$$job.log | head -5; \
	  [ "$$(cat build/fuzz/job-$$job.rc)" = 0 ] || status=1; \
	done; \
	echo "$(FUZZ_RUNS) inputs in $$(( $$(date +%s) - start )) s over $(FUZZ_JOBS) jobs"; exit $$status

test-c:
	$(PY) -m pytest

# The twin run covers what depends on the parser; the backends' own end-to-end tests ran above.
test-python:
	WAKEGATE_PUREPYTHON=1 $(PY) -m pytest -m "not backend"

bench-parse: setup
	$(PY) -m pytest bench/test_parse.py --benchmark-only --benchmark-enable --benchmark-columns=min,median,mean,ops -p no:cacheprovider

bench: setup
	$(PY) -m bench all

clean:
	rm -rf $(VENV) build *.egg-info proxy/*.so .pytest_cache .hypothesis .benchmarks
