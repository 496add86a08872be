# Tessera: `make demo` runs the whole loop on generated data; `make test` runs every test, the Docker image's
# build and smoke test included. Both set up everything they need on a fresh machine (Python 3.11, pip, gcc;
# root for apt-get, and for a Docker engine where none runs).
PYTHON ?= python3.11
VENV ?= .venv
LS_VENV ?= .venv-ls
PIP_FLAGS ?= --disable-pip-version-check -q

.PHONY: demo demo-quick test test-fast venv venv-ls redis bench bench-table screenshot clean \
	docker-engine docker-image docker-test docker-e2e docker-stop

$(VENV)/.installed: setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	@echo "[1/3] creating $(VENV) (once; later runs reuse it)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	@echo "[2/3] installing torch 2.13.0 (CPU) into $(VENV), ~1 minute"
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	@echo "[3/3] installing Tessera and its dependencies into $(VENV)"
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	# label-studio-ml is no longer a dependency; left in a reused venv, its Flask 1.1.2 pin fails `pip check`
	$(VENV)/bin/pip uninstall $(PIP_FLAGS) -y label-studio-ml
	touch $@

$(LS_VENV)/.installed:
	@echo "installing label-studio 1.23.2 into $(LS_VENV) (once, about 2 minutes)"
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install $(PIP_FLAGS) label-studio==1.23.2
	touch $@

venv: $(VENV)/.installed
venv-ls: $(LS_VENV)/.installed

redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package) for the Redis/RQ tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: venv venv-ls
	$(VENV)/bin/tessera demo

demo-quick: venv venv-ls
	$(VENV)/bin/tessera demo --quick

# every test; the Docker stage (docker-image: engine, base image, build) first, so its output shows in the log,
# and tests/test_docker_image.py runs the image. A dockerd started here is stopped afterwards.
test: venv venv-ls redis docker-image
	@status=0; $(VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) || status=$$?; \
	docker/engine.sh stop; exit $$status

# unit and HTTP tests only: no Label Studio, no Redis, no Docker
test-fast: venv
	TESSERA_SKIP_LS=1 TESSERA_SKIP_REDIS=1 $(VENV)/bin/python -m pytest -p no:cacheprovider -m "not e2e and not docker" $(PYTEST_ARGS)

# ---- Docker (README "Docker sidecar"); DOCKER_IMAGE is the tag compose runs
DOCKER_IMAGE ?= tessera:local

# a Docker engine that answers: Debian's docker.io installed and dockerd started where none runs (root)
docker-engine:
	@docker/engine.sh start

# the image: the FROM image (pulled, or a local Debian stand-in where no registry answers), torch's CPU wheel
# from this machine's pip sources if it has one, pip trusting this machine's CA bundle. Where no Docker
# engine can run this says so and stops here; tests/test_docker_image.py then skips with the same reason.
docker-image:
	@rc=0; docker/engine.sh start || rc=$$?; \
	if [ $$rc = 3 ]; then echo "docker: SKIPPED, no Docker engine can run here (see above)"; \
	elif [ $$rc != 0 ]; then exit $$rc; else docker/build.sh $(DOCKER_IMAGE); fi

# the image's smoke test alone (builds first; warm: seconds)
docker-test: venv redis docker-image
	$(VENV)/bin/python -m pytest -p no:cacheprovider tests/test_docker.py tests/test_docker_image.py $(PYTEST_ARGS)

# the compose stack end to end (docker/e2e/compose_e2e.py): Label Studio (pulled, or a stand-in built here),
# Tessera, Redis, the worker; retrieve predictions, Start training reaching the worker, down/up keeping data
docker-e2e: venv docker-image
	docker/e2e/stand-ins.sh
	$(VENV)/bin/python docker/e2e/compose_e2e.py

# stop the dockerd that docker-engine started (none other)
docker-stop:
	@docker/engine.sh stop

# benchmarks need ../shared/data beside the repository; each writes bench/results/<name>.json
bench: venv venv-ls
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[bench]'
	$(VENV)/bin/python -m bench.speed
	$(VENV)/bin/python -m bench.label_model
	$(VENV)/bin/python -m bench.gan
	$(VENV)/bin/python -m bench.active_learning
	$(VENV)/bin/python -m bench.learning_latency
	$(VENV)/bin/python -m bench.micro
	$(MAKE) bench-table

bench-table: venv
	$(VENV)/bin/python -m bench.make_table --out bench/RESULTS.md

# README screenshot: Debian chromium driven by playwright against the demo
screenshot: venv venv-ls
	test -x /usr/bin/chromium || apt-get install -y -qq chromium
	$(VENV)/bin/pip install $(PIP_FLAGS) playwright
	$(VENV)/bin/python -m bench.screenshot --start --data-dir .demo --out docs/screenshot.png

clean:
	rm -rf $(VENV) $(LS_VENV) .cache
