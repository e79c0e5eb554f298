# Two commands for a fresh machine (see README):
#   make demo   set everything up, then run every notebook in order on the synthetic cohort
#   make test   set everything up, then run the whole test suite (notebooks included)
#
# TORCH_SPEC picks the PyTorch build installed into .venv. The default is the CPU build pinned for
# CI; GPU users keep their CUDA torch with `make demo USE_SYSTEM_TORCH=1` (the venv then sees the
# system's site-packages) or install CUDA torch into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
USE_SYSTEM_TORCH ?= 0
DRASCLR_OUT ?= outputs
# laptop: the notebooks as committed (what CI runs, ~10 min on 2 cores); paper: PROFILE="paper" in each
# notebook, the published settings, for GPUs. Extra papermill parameters: make demo PARAMS="-p SEED=1 -p 02:LR=0.5"
DEMO_PROFILE ?= laptop
PARAMS ?=
export DRASCLR_OUT

.PHONY: demo test install clean-outputs

$(VENV)/.installed: pyproject.toml
	@if [ "$(USE_SYSTEM_TORCH)" = "1" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	 else $(PY) -m pip install $(TORCH_SPEC); fi
	$(PY) -m pip install -e ".[test]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m drasclr_lib.runner --out "$(DRASCLR_OUT)" --profile $(DEMO_PROFILE) $(PARAMS)

test: install
	$(PY) -m pytest -q

clean-outputs:
	rm -rf "$(DRASCLR_OUT)"
