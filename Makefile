# Qantara: the two commands of a fresh machine are `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
# Debian packages the tests use: mosquitto (private brokers for fault tests), promtool
# (prometheus) to check /metrics and the alert rules, dcmtk as a DICOM peer, dicom3tools
# (dciodvfy) to check the simulator's images against their IODs, docker-compose to validate
# docker-compose.yml (no Docker daemon is needed for `config -q`).
DEBIAN_PACKAGES := mosquitto prometheus dcmtk dicom3tools docker-compose
DEBIAN_COMMANDS := mosquitto promtool storescu dciodvfy docker-compose

.PHONY: up test lint format install install-dev system-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

install: $(STAMP)
install-dev: $(DEV)

# Installs the Debian packages that are missing (as root, or with sudo when available).
system-deps:
	@missing=""; for c in $(DEBIAN_COMMANDS); do \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; \
	  else echo "not root and no sudo: install $(DEBIAN_PACKAGES) yourself" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    $(DEBIAN_PACKAGES) >/dev/null; \
	fi

up: install
	$(BIN)/qantara up

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install-dev system-deps lint
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python bench/mqtt_ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# Production shape (docker-compose.yml): generates the private CA, TLS certificates, the broker's
# password file (one user per unit of UNITS, plus the gateways') into deploy/secrets/ (git-ignored)
# and writes .env from deploy/secrets/compose.env when there is none. Re-run to add units.
# SENDERS: client certificates for mutual TLS, CN = a modality's AE title or a lab's MSH-4.1;
# REVOKE: senders whose certificates go on deploy/secrets/crl.pem (QANTARA_*_TLS_CRL).
UNITS ?=
SENDERS ?=
REVOKE ?=
.PHONY: certs
certs: system-deps
	UNITS="$(UNITS)" SENDERS="$(SENDERS)" REVOKE="$(REVOKE)" bash deploy/make_secrets.sh deploy/secrets
	@if [ -f .env ]; then echo ".env exists: left as is (new values in deploy/secrets/compose.env)"; \
	else cp deploy/secrets/compose.env .env && chmod 600 .env && echo "wrote .env"; fi
