# vdpa-svq — the two entry points are `make test` and `make demo`; the rest are their parts.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo deps venv unit kernel migrate-test lint bench clean

test: deps venv lint unit asan fuzz-ci kernel migrate-test

deps:  ## Debian packages the build and the tests need (installed only when missing; needs root)
	@tools/install-debian-deps

venv: $(STAMP)
$(STAMP): pyproject.toml setup.py $(wildcard vdpa_svq/*.[ch] vdpa_svq/softdev/*.[ch])  # every C source and header
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check .

unit: venv  ## host tests: everything but the real-device tests
	$(PY) -m pytest -m 'not kernel and not migration' -q

kernel: venv  ## real-device tests, inside the kernel bench guest
	$(PY) tools/kbench setup
	$(PY) tools/kbench run -- $(abspath $(PY)) -m pytest -m kernel -q -p no:cacheprovider tests/kernel

migrate-test: deps venv  ## a real QEMU guest live-migrated through serve, A -> B -> A, split and packed; prints a verdict
	$(PY) tools/kbench setup
	$(PY) -m pytest -m migration -q -p no:cacheprovider tests/migration

demo: deps venv
	tools/demo

bench: deps venv  ## relay, vhost-user on the host, latency on the host, vhost-user on vhost-vdpa in the kernel bench; all into BENCHMARKS.md
	$(PY) setup.py -q build_ext --inplace  # the C relay as it is now, not as the venv stamp last saw it
	$(PY) -m bench.relay
	$(PY) -m bench.vhost_user --write BENCHMARKS.md
	$(PY) -m bench.latency --write BENCHMARKS.md
	$(PY) -m bench.scaling --write BENCHMARKS.md
	$(PY) tools/kbench setup
	$(PY) -m bench.vhost_user --kernel --write BENCHMARKS.md
	$(PY) -m bench.migration --write BENCHMARKS.md

.PHONY: bench-vhost-user bench-vhost-user-kernel bench-latency bench-scaling bench-migration
bench-migration: deps venv  ## live-migration downtime and total time of a real VM, serve vs QEMU's own virtio-net; into BENCHMARKS.md
	$(PY) tools/kbench setup
	$(PY) -m bench.migration --write BENCHMARKS.md

bench-vhost-user: deps venv  ## vhost-user: testpmd virtio-user through `vdpa-svq serve soft:net` vs DPDK's vhost PMD
	$(PY) -m bench.vhost_user

bench-latency: deps venv  ## round-trip p50/p99 and CPU per packet at fixed rates, serve vs DPDK's vhost PMD; idle CPU; into BENCHMARKS.md
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m bench.latency --write BENCHMARKS.md

bench-scaling: deps venv  ## 1 and 2 queue pairs, total and per-queue pps, serve soft:net,pairs=N vs DPDK's vhost PMD; into BENCHMARKS.md
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m bench.scaling --write BENCHMARKS.md

bench-vhost-user-kernel: deps venv  ## testpmd on /dev/vhost-vdpa-N directly vs through `vdpa-svq serve` (kbench guest; SMP=N: N vCPUs)
	$(PY) tools/kbench setup
	$(PY) -m bench.vhost_user --kernel $(if $(SMP),--smp $(SMP))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

.PHONY: soak
soak: deps venv  ## serve under frontends that connect, run traffic, misbehave and vanish for SOAK_SECONDS (300): fds/threads/RSS into RELIABILITY.md
	$(PY) -m tests.vhost_user.soak --seconds $(or $(SOAK_SECONDS),300) --write RELIABILITY.md

# -- sanitizers and fuzzing (issue 12) -------------------------------------------------------------
.PHONY: asan fuzz fuzz-ci fuzz-seeds
ASAN_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 VDPA_SVQ_EXT_DIR=build/asan
asan: deps venv  ## the relay test suite once more, on the C extensions built with ASan + UBSan (gcc)
	PY=$(PY) tools/build-sanitized asan
	$(ASAN_ENV) $(PY) -m pytest -q -m 'not kernel' -p no:cacheprovider tests/relay tests/differential tests/softdev tests/spec \
		tests/guest tests/bench/test_latency_frontends.py

fuzz: deps venv  ## every fuzz target for FUZZ_SECONDS (600) each from its seeds (FUZZ_TARGETS: a subset); results into fuzz/README.md
	PY=$(PY) tools/build-sanitized fuzz
	$(PY) -m fuzz.run --seconds $(or $(FUZZ_SECONDS),600) $(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS)) --write fuzz/README.md

fuzz-ci: deps venv  ## every fuzz target for 60 s: what CI runs
	PY=$(PY) tools/build-sanitized fuzz
	$(PY) -m fuzz.run --seconds 60

fuzz-seeds: venv  ## rewrite the committed seed corpus (after a target's input format changed)
	$(PY) -m fuzz.make_seeds
