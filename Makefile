# Set-up is part of every target: a fresh Debian 12 machine needs only `make demo`
# or `make test`. The venv uses the system python3 so Debian's python3-setools
# (not PyPI's unrelated "setools") is importable.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := semodule-utils secilc policycoreutils python3-setools python3-semanage python3-venv \
	python3-pip python3-matplotlib util-linux redis-server openssl
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
STAMP := $(VENV)/.selcache-installed

.PHONY: all deps demo test test-fast typecheck bench clean

all: test

deps: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -c "import setools, diskcache, watchdog, redis, cryptography"
	touch $@

demo: deps
	$(SUDO) ./scripts/demo.sh

test: deps
	$(SUDO) $(PY) -m pytest -q

test-fast: deps
	$(SUDO) $(PY) -m pytest -q -m "not refpolicy"

typecheck: deps
	$(PY) -m mypy selcache

# Regenerates benchmarks/results/latest.{json,md,png} and the README's table,
# then the fleet scenario (benchmarks/results/fleet.{json,md}).
# BENCH_RUNS=3 for fewer rounds, BENCH_SCALING=0 to skip the 3x/10x stores,
# BENCH_FLEET=0 to skip the fleet scenario.
BENCH_RUNS ?= 5
BENCH_SCALING ?= 1
BENCH_FLEET ?= 1
bench: deps
	$(SUDO) $(PY) -m benchmarks --runs $(BENCH_RUNS) \
		$(if $(filter 0 no false,$(BENCH_SCALING)),--no-scaling,)
	$(if $(filter 0 no false,$(BENCH_FLEET)),,$(SUDO) $(PY) benchmarks/fleet.py --machines 20)

clean:
	rm -rf $(VENV) .cache demo-root .pytest_cache .mypy_cache
