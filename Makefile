# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench lint proto clean up down

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/atp-extproc stack --config examples/atp.yaml --workdir .run

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

# ATP's own .proto contracts (proto/) compiled with grpcio-tools.
PROTOS := $(wildcard proto/atp/*.proto)
proto: install
ifneq ($(PROTOS),)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. $(PROTOS)
endif

# The compose stack (docs/deployment.md); needs a Docker engine.
up:
	docker compose up --build

down:
	docker compose down

clean:
	rm -rf $(VENV) .run build *.egg-info
