# The two commands a user needs: `make demo` and `make test`. Both install what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration lint deps venv clean bench image walkthrough haproxy-versions debian13-rootfs

deps:
	bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV) || { bash scripts/install-deps.sh && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Every supported HAProxy, as $HAPROXY_CONSUL_CACHE/bin/haproxy-X.Y (default
# /var/cache/haproxy-consul): 2.6 is the host's, 3.0/3.2/3.4 run from Debian root filesystems
# built once per machine (a few minutes the first time, a quick check afterwards).
haproxy-versions: deps
	bash scripts/haproxy-rootfs.sh

# A fresh Debian 13 "trixie" (debootstrap minbase) for tests/integration/test_debian13.py, which runs
# the README's commands on an overlay of it: built once per machine in $HAPROXY_CONSUL_CACHE
# (default /var/cache/haproxy-consul), ~40 s the first time, a quick check afterwards.
HAPROXY_CONSUL_CACHE ?= /var/cache/haproxy-consul
debian13-rootfs: deps
	$$([ "$$(id -u)" -eq 0 ] || echo sudo) bash scripts/debian-rootfs.sh trixie $(HAPROXY_CONSUL_CACHE)/rootfs/debian13-ci

demo: deps venv
	$(BIN)/python scripts/demo.py

test: deps venv haproxy-versions debian13-rootfs
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest

# Benchmarks (not part of the tests): each prints its figures and writes bench/out/.
bench: deps venv
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/propagation.py 200
	$(BIN)/python bench/churn_errors.py 200 20
	$(BIN)/python bench/scale.py 1000 5000 10000
	$(BIN)/python bench/idle.py 60
	$(BIN)/python bench/https.py 50 5
	$(BIN)/python bench/acme_issue.py 20
	$(BIN)/python bench/registrator_drain.py 2
	$(BIN)/python bench/routers.py 50 5
	$(BIN)/python bench/live.py

# The container image, tagged haproxy-consul:latest and haproxy-consul:<version> in the engine
# DOCKER_HOST names (IMAGE_ARGS=--debootstrap: never try a registry for the base).
image: deps venv
	@$(BIN)/python scripts/build_image.py $(IMAGE_ARGS)

# The README's three-host walkthrough on one machine (127.0.0.1-3), run from the README's own
# blocks; Ctrl-C removes what it started (WALKTHROUGH_ONCE=1: check, clean up, exit).
walkthrough: deps venv
	@$(BIN)/python scripts/walkthrough.py

unit: venv
	$(BIN)/pytest tests/unit

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
