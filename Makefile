# make demo: install (into .venv, once) and run the demo job.  make test: install and run the tests.
# make bench: the scale benchmarks.  make install-cuda: the CUDA stack into .venv instead (GPU machines).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU stack, a matched set (fbgemm-gpu 1.X pairs with torch 2.(X+5)); see README for CUDA.
TORCH := torch==2.13.0
FBGEMM := fbgemm-gpu-cpu==1.8.0
TORCHREC := torchrec==1.8.0
# The CUDA stack, one matched set for one pip command (README "Install"): torch 2.11.0 is a CUDA 13.0
# build on the registry (driver R580+); fbgemm-gpu 1.6.0 pairs with it; torchrec 1.6.1 pairs with
# fbgemm-gpu 1.6 (alone it would pull fbgemm-gpu 1.9.0); tensordict 0.15.3 is the one for torch 2.11.
# Older drivers: CUDA_INDEX=https://download.pytorch.org/whl/cu128 (or cu126) takes both torch and
# fbgemm-gpu from that index.
CUDA_TORCH := torch==2.11.0 fbgemm-gpu==1.6.0
CUDA_REC := torchrec==1.6.1 tensordict==0.15.3
CUDA_INDEX ?=

.PHONY: demo test bench install install-cuda clean

# Once `make install-cuda` has put the CUDA stack in .venv, `make install` (and so demo / test) keeps
# it: it never writes the CPU stack over it (remove .venv to go back).
STAMP := $(if $(wildcard $(VENV)/.installed-cuda),$(VENV)/.installed-cuda,$(VENV)/.installed)

install: $(STAMP)

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) $(FBGEMM)
	# --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu; its real deps come from pyproject.
	$(BIN)/python -m pip install --quiet --no-deps $(TORCHREC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torchrec, fbgemm_gpu, recsys; print('installed torch', __import__('torch').__version__, 'torchrec', torchrec.__version__)"
	touch $@

# The CUDA stack in .venv (replacing the CPU one if it was there); make demo / make test then use it.
install-cuda: $(VENV)/.installed-cuda

$(VENV)/.installed-cuda: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes fbgemm-gpu-cpu || true
ifeq ($(CUDA_INDEX),)
	$(BIN)/python -m pip install --quiet $(CUDA_TORCH) $(CUDA_REC)
else
	$(BIN)/python -m pip install --quiet --index-url $(CUDA_INDEX) $(CUDA_TORCH)
	$(BIN)/python -m pip install --quiet $(CUDA_REC)
endif
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, recsys; print('installed torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchrec', torchrec.__version__, 'fbgemm-gpu', fbgemm_gpu.__version__, '; GPUs visible:', torch.cuda.device_count())"
	rm -f $(VENV)/.installed
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
