# One-command entry points. Each target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that installs from the machine's wheel cache; GPU images pin their own (Dockerfile).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test serve clean

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	./scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	PYTHON=$(PY) scripts/run-tests.sh

# The model to serve: AVATAR_FORCING_CONFIG / AVATAR_FORCING_WEIGHTS when set (official weights: see README);
# otherwise, where the reference golden folder is beside the checkout, its small model with random weights.
SMALL ?= ../shared/golden/avatar_forcing_ref_v1

serve: install
	@if [ -z "$$AVATAR_FORCING_CONFIG$$AVATAR_FORCING_WEIGHTS" ] && [ -f "$(SMALL)/small_config.json" ]; then \
		echo "make serve: no model configured; serving the small reference model (random weights) from $(SMALL)"; \
		export AVATAR_FORCING_CONFIG="$(SMALL)" AVATAR_FORCING_WEIGHTS="$(SMALL)/small_weights.safetensors"; \
	fi; exec $(VENV)/bin/avatar-forcing serve

clean:
	rm -rf $(VENV) build *.egg-info
