# `make run` and `make test` set themselves up on a fresh machine (see scripts/setup.sh).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup run test test-all timm-contract lint bench bench-seg bench-data report clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "" $(ARGS)

# timm's own model test-suite (tests/test_models.py of the pinned timm's sdist, fetched once) on every vittm_* model;
# ARGS goes to pytest, e.g. ARGS='-k vittm_test -x'. Not part of `make test` (about 12 min on 2 cores).
timm-contract: $(STAMP)
	bash scripts/timm_contract.sh $(ARGS)

# ViTTM vs ViT side by side (README "Performance"); ARGS adds Hydra overrides, e.g. ARGS='bench.modes=[train]'
bench: $(STAMP)
	$(PY) -m vittm.bench 'bench.models=[vit_base_patch16_224,vittm_base,vit_small_patch16_224,vittm_small]' $(ARGS)

# Segmentation forward (backbone + Segmenter decoder, batch 1, 512², sliding window, fp32) of ViTTM-B vs ViT-B
# (README "Segmentation"); ARGS adds options, e.g. ARGS='--images 50'
bench-seg: $(STAMP)
	$(PY) -m vittm.bench.segmentation --models vittm_b vit_b $(ARGS)

# Table + plots of a sweep: make report DIR=outputs/<study>/multiruns/<time> [ARGS='--out somewhere']
report: $(STAMP)
	$(PY) -m vittm.studies.report $(DIR) $(ARGS)

bench-data: $(STAMP)
	$(PY) -m vittm.bench.data $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check vittm tests run.py cli.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
