# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
RUNTIME := $(VENV)/.installed

.DEFAULT_GOAL := all
.PHONY: all install format lint mypy test test-unit testcov demo bench migrate clean

# The demo needs only the runtime dependencies; tests and linters add the dev extra.
$(RUNTIME): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (set PY=...)"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	@touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

format: $(STAMP)
	$(BIN)/ruff format cascade workers tests bench
	$(BIN)/ruff check --fix cascade workers tests bench

lint: $(STAMP)
	$(BIN)/ruff check cascade workers tests bench migrations

mypy: $(STAMP)
	$(BIN)/mypy cascade

# The RabbitMQ variants of the reliability tests run when CASCADE_TEST_AMQP_URL is set, or a RabbitMQ answers on
# 127.0.0.1:5672 (guest); otherwise they are skipped, the reason shown in the summary (-rs).
AMQP_PROBE = $(shell $(PY) -c "import socket; socket.create_connection(('127.0.0.1', 5672), 1)" 2>/dev/null \
	&& echo amqp://guest:guest@127.0.0.1:5672//)

# Lint, types and the whole suite (unit + integration on embedded or given services). Three pytest workers on two
# cores: most tests wait on workers, sims and brokers (two workers kept the CPU under 40 % busy).
test: lint mypy
	CASCADE_TEST_AMQP_URL="$${CASCADE_TEST_AMQP_URL:-$(AMQP_PROBE)}" $(BIN)/python -m pytest -n 3 -p no:cacheprovider -rs

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" -p no:cacheprovider

testcov: test

demo: $(RUNTIME)
	$(BIN)/cascade demo

bench: $(STAMP)
	$(BIN)/python -m bench

migrate: $(STAMP)
	$(BIN)/cascade db upgrade

all: lint mypy test

clean:
	rm -rf $(VENV) .cascade
