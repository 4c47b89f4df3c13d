# make demo: install (into .venv, once) and run the demo job.  make test: install and run the tests.
# make bench: the scale benchmarks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU stack, a matched set (fbgemm-gpu 1.X pairs with torch 2.(X+5)); see README for CUDA.
TORCH := torch==2.13.0
FBGEMM := fbgemm-gpu-cpu==1.8.0
TORCHREC := torchrec==1.8.0

.PHONY: demo test bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) $(FBGEMM)
	# --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu; its real deps come from pyproject.
	$(BIN)/python -m pip install --quiet --no-deps $(TORCHREC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torchrec, fbgemm_gpu, recsys; print('installed torch', __import__('torch').__version__, 'torchrec', torchrec.__version__)"
	touch $@

demo: install
	$(BIN)/python -m recsys.train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# The scale benchmarks (docs/scale.md): tables printed, JSON + markdown under benchmarks/results/.
bench: install
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/eval.py
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf outputs multirun .pytest_cache
