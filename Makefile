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
	$(PY) -m pytest

GOLDEN ?= ../shared/golden/avatar_forcing_ref_v1
MEDIA ?= ../shared/media

# Until the WebRTC server lands: the offline demo with the small reference configuration.
serve: install
	mkdir -p out
	$(VENV)/bin/avatar-forcing generate --config $(GOLDEN) --weights $(GOLDEN)/small_weights.safetensors \
		--avatar-image $(MEDIA)/rumi.jpg --avatar-audio $(MEDIA)/avatar.wav --user-video $(MEDIA)/user.mp4 \
		-o out/demo.mp4

clean:
	rm -rf $(VENV) build *.egg-info
