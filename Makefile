# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench lint proto clean up down k8s-configmap

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/atp-extproc stack --config examples/atp.yaml --workdir .run $(addprefix --port ,$(PORTS))

test: install
	$(BIN)/python -m pytest -q

# Load generator: wrk from Debian's packages when it is not there yet.
WRK := $(shell command -v wrk 2>/dev/null)
bench: install
ifeq ($(WRK),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
endif
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check atp_extproc tests bench

# ATP's own .proto contracts (proto/) compiled with grpcio-tools; a test checks the
# committed output is what this produces.
PROTOS := $(wildcard proto/atp/*.proto)
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=atp_extproc/policy/gen \
		--pyi_out=atp_extproc/policy/gen $(PROTOS)

# The compose stack (docs/deployment.md); needs a Docker engine.
up:
	docker compose up --build

down:
	docker compose down

# deploy/k8s/configmap.yaml carries copies of the shipped configs; a test checks them.
k8s-configmap: install
	$(BIN)/python deploy/k8s/render_configmap.py

clean:
	rm -rf $(VENV) .run build *.egg-info
