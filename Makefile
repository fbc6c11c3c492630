# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make run    install the Debian packages, create the venv, install, ensure RabbitMQ + etcd, run the stack
#   make test   the same set-up, then the whole test suite
VENV ?= .venv
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN := $(VENV)/bin
# Debian's base image for `make image` (see README, Docker); IMAGE_BASE=python:3.11-slim where Docker Hub is reachable.
IMAGE_BASE ?= inferq-base:bookworm
IMAGE_ROOTFS ?= /tmp/inferq-bookworm-rootfs

# Python 3.10 (JetPack 6's): the agent and worker tests in a venv of their own (pyenv's 3.10 by default).
PYTHON310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python) python3.10)

.PHONY: run test test-features test-faults test-install test-py310 test-cluster soak install system-deps services cluster cluster-stop bench clean grpc-stubs image image-base

run: services
	$(BIN)/inferq up

test: services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The feature suites that each start many processes (about 8 minutes): the registry and canaries, the edge-node
# agent, pipelines and data sharding, webhooks, the status page in Chromium, large results. CI runs it after
# `make test`; the agent's installs stay in test-install.
test-features: services
	$(BIN)/python -m pytest -q -m 'features and not install' $(PYTEST_ARGS)

# The fault suite (about 5 minutes): a broker node SIGKILLed under load, memory alarms, drains, crashed and killed
# processes under `inferq up`, the result spool across a broker cut. CI runs it after `make test`.
test-faults: services
	$(BIN)/python -m pytest -q -m faults $(PYTEST_ARGS)

# The edge-node agent and worker tests on Python 3.10, as a Jetson with JetPack 6 runs them (and the webhook
# sender, the edge part that used 3.11-only asyncio).
test-py310: services
	[ -x .venv310/bin/python ] || $(PYTHON310) -m venv .venv310
	.venv310/bin/pip install -q -e '.[server,test]'
	.venv310/bin/python -m pytest -q -m 'not cluster and not soak and not install' tests/test_agent.py tests/test_shard.py tests/test_supervision.py tests/test_webhooks.py tests/test_spool.py $(PYTEST_ARGS)

# The broker-SIGKILL soak: a RabbitMQ node of the test's own killed 9 times in 180 s under load, 5 runs (~20 min).
soak: services
	$(BIN)/python -m pytest -q -s -m soak $(PYTEST_ARGS)

# Installs into fresh venvs (about 2 minutes): the agent through `inferq agent install` and through the edge's
# `curl | sh` with Python 3.10 (tests/test_agent.py), and a client-only install (tests/test_client_install.py).
# CI runs it after `make test`.
test-install: services
	$(BIN)/python -m pytest -q -m install $(PYTEST_ARGS)

# Cluster mode: tests that start a 3-node RabbitMQ + 3-member etcd cluster of their own (slow: about 6
# minutes on 2 cores). -s shows the figures each scenario prints ("[cluster figures] ...").
test-cluster: install system-deps
	$(BIN)/python -m pytest -q -s -m cluster $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[server,test]'
	touch $@

# python3-venv first: Debian's python3 cannot make a venv without it. etcd-client has etcdctl (README, Scaling);
# README's examples use curl. chromium: tests/test_status_page.py drives it through playwright (no browser download).
system-deps:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null || missing="$$missing etcd-client"; \
	command -v rabbitmq-server >/dev/null || missing="$$missing rabbitmq-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

# --min-open-files: a RabbitMQ started outside systemd keeps the shell's 1024 descriptors, which one test session's
# quorum queues use up (it then refuses connections); as root, `services` restarts such a node with more.
services: install system-deps
	$(BIN)/inferq services --min-open-files 16384

# A local 3-node RabbitMQ cluster and 3-member etcd under .state/cluster (ports 5673-5675, 12379/12389/12399).
cluster: install system-deps
	$(BIN)/inferq services --cluster 3

cluster-stop: install
	$(BIN)/inferq services --cluster-stop

# The BentoML and Ray Serve peers each get a virtualenv of their own (Ray is large; neither enters .venv).
bench: services .venv-bench-bentoml/.installed .venv-bench-ray/.installed
	$(BIN)/pip install -q -e '.[server,test,bench]'
	$(BIN)/inferq bench $(BENCH_ARGS)

.venv-bench-%/.installed: benchmarks/peers/requirements-%.txt
	[ -x .venv-bench-$*/bin/python ] || $(PYTHON) -m venv .venv-bench-$*
	.venv-bench-$*/bin/pip install -q -r $<
	touch $@

# Regenerates the committed gRPC stubs of edge/proto/ (see its __init__.py); grpcio-tools stays out of every install.
GRPC_TOOLS := .grpc-tools
grpc-stubs:
	$(PYTHON) -m venv $(GRPC_TOOLS)
	$(GRPC_TOOLS)/bin/pip install -q 'grpcio-tools==1.66.2'
	$(GRPC_TOOLS)/bin/python -m grpc_tools.protoc -I edge/proto --python_out=edge/proto --grpc_python_out=edge/proto \
		edge/proto/grpc_service.proto edge/proto/model_config.proto
	rm -f edge/proto/model_config_pb2_grpc.py
	sed -i 's/^import \(model_config_pb2\|grpc_service_pb2\) as /from inferq.edge.proto import \1 as /' edge/proto/*_pb2*.py

# The image of Dockerfile, built from a Debian bookworm made here with debootstrap (no Docker Hub needed);
# needs docker and a running dockerd. `make image IMAGE_BASE=python:3.11-slim` skips the debootstrap.
image: $(if $(filter inferq-base:bookworm,$(IMAGE_BASE)),image-base)
	docker build --network host --build-arg BASE_IMAGE=$(IMAGE_BASE) -t inferq:latest .
	docker run --rm --network none inferq:latest --help >/dev/null && echo "inferq:latest built; 'docker run --rm inferq:latest --help' works"

image-base:
	@if docker image inspect $(IMAGE_BASE) >/dev/null 2>&1; then echo "$(IMAGE_BASE) exists"; else \
		command -v debootstrap >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q debootstrap; }; \
		$(SUDO) rm -rf $(IMAGE_ROOTFS) && \
		$(SUDO) debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm $(IMAGE_ROOTFS) && \
		$(SUDO) cp /etc/ssl/certs/ca-certificates.crt $(IMAGE_ROOTFS)/etc/ssl/certs/ca-certificates.crt && \
		printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' | $(SUDO) tee $(IMAGE_ROOTFS)/etc/pip.conf >/dev/null && \
		$(SUDO) tar -C $(IMAGE_ROOTFS) -c . | docker import - $(IMAGE_BASE) && $(SUDO) rm -rf $(IMAGE_ROOTFS); fi

# Stops the etcd that `inferq services` started from here (its data is in .state/etcd) before deleting anything;
# refuses if another etcd uses .state/etcd.
clean:
	@if [ -x $(BIN)/inferq ]; then $(BIN)/inferq services --stop etcd || exit 1; \
	elif [ -f .state/etcd.pid ] && kill -0 "$$(cut -d' ' -f1 .state/etcd.pid)" 2>/dev/null; then \
		echo "etcd (pid $$(cut -d' ' -f1 .state/etcd.pid)) keeps its data in .state/etcd: stop it first"; exit 1; fi
	rm -rf $(VENV) .venv310 .state *.egg-info $(GRPC_TOOLS)
