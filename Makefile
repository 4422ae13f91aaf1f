# bloodcell: `make demo` runs the main job, `make test` runs the tests, `make lint` checks the code.
# All set up .venv first when needed (torch 2.14.1 + torchvision 0.29.1 + the package with
# its test and scale extras: Ray and MLflow, whose tests run in CI).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# the dataset: DATA=/path/to/pbc, default ../shared/data/pbc when it exists
DATA    ?= $(shell [ -d ../shared/data/pbc ] && echo ../shared/data/pbc)
OUT     ?= runs/demo

.PHONY: install test lint demo study model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,scale]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

# ruff (config in pyproject.toml); the import layers are checked by tests/test_layers.py
lint: install
	$(BIN)/ruff check src tests benchmarks scripts

# with no data folder: the 16 example cells shipped in the package (src/bloodcell/examples)
demo: install
	@if [ -z "$(DATA)" ]; then \
	  echo "No data folder (no DATA= and no ../shared/data/pbc): classifying the 16 example cells shipped with bloodcell."; \
	  $(BIN)/bloodcell predict --examples --out $(OUT)/examples.csv || exit $$?; \
	  echo; \
	  echo "That was the demo on the bundled example cells. To classify real data: make demo DATA=/path/to/pbc"; \
	  echo "(a folder of class sub-folders of images, or any folder of cell images: $(BIN)/bloodcell predict DIR)."; \
	  echo "Get the PBC dataset (Acevedo et al. 2020, CC BY 4.0): https://data.mendeley.com/datasets/snkd93bnjr/1"; \
	  echo "or run: $(BIN)/bloodcell fetch-data --out data/pbc"; \
	else \
	  $(BIN)/bloodcell predict "$(DATA)" --out $(OUT)/results.csv; \
	fi

# The study's own settings: 224 px, up to 30 epochs, early stopping (patience 3), generation 5
# on frozen Lite0 and Lite2. The CPU-capped variant (docs/study-capped): STUDY_ARGS="$(STUDY_CAPPED)".
STUDY_ARGS ?=
STUDY_OUT  ?= runs/study
STUDY_CAPPED = --models dnn,cnn,cnn-aug,cnn3,lite0-frozen,lite0-finetune --image-size 128,lite0-finetune=160 \
  --epochs-cap 10,dnn=6,cnn=6,cnn-aug=8,lite0-frozen=4,lite0-finetune=12

study: install
	$(BIN)/bloodcell study --data "$(DATA)" --out $(STUDY_OUT) $(STUDY_ARGS)

# The shipped model from scratch (docs/model-card.md): the recipe on the seed-42 split, its
# temperature and review threshold on validation, test metrics, the int8 file. Bundling it
# into the package is a separate, deliberate step (only a model that measures better).
MODEL_OUT ?= runs/recipe-s42
MODEL     ?= lite0-recipe
SEED      ?= 42
TRAIN_ARGS ?=
model: install
	$(BIN)/bloodcell train --model $(MODEL) --data "$(DATA)" --out $(MODEL_OUT) --seed $(SEED) $(TRAIN_ARGS)
	$(BIN)/bloodcell calibrate --model $(MODEL_OUT) --data "$(DATA)" --out $(MODEL_OUT)/calibration.json
	$(BIN)/bloodcell evaluate --model $(MODEL_OUT) --data "$(DATA)" --split test --out $(MODEL_OUT)/eval-test
	$(BIN)/bloodcell export --model $(MODEL_OUT) --format onnx-int8 --data "$(DATA)"
	@echo "made $(MODEL_OUT); to ship it (only if it measures better): $(BIN)/python scripts/bundle_model.py $(MODEL_OUT)"

clean:
	rm -rf runs/demo .pytest_cache
