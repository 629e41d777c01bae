# Two commands work on a fresh machine: `make demo` and `make test`. Both create .venv and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
DEMO := demo-out

.PHONY: demo demo-continuous test test-fast bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# gRPC protos of TF Serving: the package pins full `tensorflow`; its modules only need tensorflow-cpu's protos.
	$(BIN)/python -m pip install -q --no-deps tensorflow-serving-api==2.21.0
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

demo-continuous: $(STAMP)
	bash scripts/demo_continuous.sh $(DEMO)/continuous

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)  # every claim in BENCHMARKS.md, one script each (tens of minutes on 2 cores)
	for b in data optimizers train real continuous distributed; do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done
	$(BIN)/python -m pip install -q -r benchmarks/requirements.txt  # the quality peers (sklearn, VW, DeepCTR-Torch)
	$(BIN)/python benchmarks/bench_quality.py

clean:
	rm -rf $(DEMO) build *.egg-info
