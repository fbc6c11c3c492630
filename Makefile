# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make run    create the venv, install, ensure RabbitMQ + etcd, run the stack with the demo models
#   make test   the same set-up, then the whole test suite
VENV ?= .venv
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN := $(VENV)/bin

.PHONY: run test install system-deps services bench clean

run: services
	$(BIN)/inferq up

test: services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

system-deps:
	@missing=""; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	command -v rabbitmq-server >/dev/null || missing="$$missing rabbitmq-server"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

services: install system-deps
	$(BIN)/inferq services

bench: services
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/inferq bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .state *.egg-info
