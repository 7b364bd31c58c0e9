# Every target sets up .venv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
MODEL := model/artifacts/cellstream-chat.onnx
HOST ?= 0.0.0.0
PORT ?= 50051

.PHONY: serve test lint protos model venv venv-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) -e '.[train,dev]'
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

serve: $(VENV)/.runtime
	$(BIN)/cellstream serve --host $(HOST) --port $(PORT) --model-dir model/artifacts

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(VENV)/.dev
	$(BIN)/python -m service.protogen

# Full training + export + quality report of the shipped default model (about 45 minutes on 2 cores).
model: $(VENV)/.dev
	$(BIN)/python -m model.train --out runs/default/model.pt --quiet
	$(BIN)/python -m model.export runs/default/model.pt --out $(MODEL)
	$(BIN)/python -m model.evaluate $(MODEL) --out model/artifacts/cellstream-chat.quality.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
