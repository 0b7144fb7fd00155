# radalign: two commands set everything up on a fresh machine: `make demo` and `make test`.
# Every target creates .venv and installs (with constraints.txt pinning torch/torchvision) when needed.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.installed
DEMO    := runs/demo
# Demo knobs (override on the command line: make demo DEMO_PATIENTS=500)
DEMO_PATIENTS ?= 4000
DEMO_WORKERS  ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow lint bench clean help mutate

help:
	@echo "make demo       set up .venv and run the whole pipeline on synthetic MIMIC into $(DEMO)/"
	@echo "make test       set up .venv, lint (ruff) and run the default test suite"
	@echo "make test-slow  the slow tests (multi-process, larger runs)"
	@echo "make bench      benchmarks in bench/ (never part of CI)"
	@echo "make lint       ruff"

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# deepspeed is an sdist whose build imports torch: install it after torch, without build isolation.
	$(PIP) install -q -c constraints.txt --no-build-isolation "deepspeed>=0.14"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/data.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/ehr.py --rows 1e6,1e7
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/degradation.py --seeds 5

# The demo: each step is a file target, so re-running skips what is complete (prepare and pretrain resume
# themselves when interrupted).
FT      := $(DEMO)/finetune
IHM     := $(FT)/in_hospital_mortality
FT_DATA := data.table=$(DEMO)/ehr/finetune data.shards=$(DEMO)/shards data.checkpoint=$(DEMO)/pretrain
# Every demo command runs through tools/demo-step: it prints the command's wall time and the running total, and
# logs it in $(DEMO)/times.tsv under this make run (its start time); `demo` ends with the table and the total.
DEMO_RUN := $(shell date +%s.%N)
STEP     = tools/demo-step $(DEMO)/times.tsv $(DEMO_RUN)

demo: $(STAMP) $(DEMO)/retrieval/example.html $(DEMO)/retrieval/classify/metrics.json $(DEMO)/ehr/manifest.json \
		$(IHM)/explain.html $(FT)/fewshot_pneumothorax/fewshot.json
	@echo; echo "== demo complete: $(DEMO)/"
	$(BIN)/radalign data info $(DEMO)/shards
	@$(BIN)/radalign summary $(DEMO)
	@echo "finetune: $(IHM)/report.md, $(IHM)/eval/report.md, $(IHM)/explain.html, $(FT)/fewshot_pneumothorax/report.md"
	@echo "similar-case lookup page: $(BIN)/radalign retrieval serve --index-dir $(DEMO)/retrieval/index --finetune-run $(IHM)  (then open http://127.0.0.1:8765/)"
	@echo; echo "== wall time per step (seconds):"; $(STEP) --total

$(DEMO)/synthetic/synth.json: | $(STAMP)
	$(STEP) 'data synth' $(BIN)/radalign data synth --out $(DEMO)/synthetic --patients $(DEMO_PATIENTS) \
		--num-workers $(DEMO_WORKERS) --image-size 160

$(DEMO)/shards/manifest.json: $(DEMO)/synthetic/synth.json
	$(STEP) 'data prepare' $(BIN)/radalign data prepare --mimic-cxr $(DEMO)/synthetic/mimic-cxr-jpg \
		--reports $(DEMO)/synthetic/mimic-cxr-reports --out $(DEMO)/shards --image-size 128 \
		--shard-size 256 --num-workers $(DEMO_WORKERS)

$(DEMO)/ehr/manifest.json: $(DEMO)/shards/manifest.json
	$(STEP) 'data link-ehr' $(BIN)/radalign data link-ehr --mimic-iv $(DEMO)/synthetic/mimic-iv --shards $(DEMO)/shards \
		--out $(DEMO)/ehr --no-progress

$(DEMO)/pretrain/export/config.json: $(DEMO)/shards/manifest.json
	$(STEP) 'pretrain' $(BIN)/radalign pretrain --config pretrain/demo run_dir=$(DEMO)/pretrain \
		data.shards=$(DEMO)/shards

$(DEMO)/zeroshot/metrics.json: $(DEMO)/pretrain/export/config.json
	$(STEP) 'zeroshot' $(BIN)/radalign zeroshot eval --export $(DEMO)/pretrain --shards $(DEMO)/shards --split test \
		--prompts chexpert14 --val-split validate --blank negative --out $(DEMO)/zeroshot

$(DEMO)/retrieval/index/manifest.json: $(DEMO)/zeroshot/metrics.json
	$(STEP) 'retrieval build' $(BIN)/radalign retrieval build --export $(DEMO)/pretrain --shards $(DEMO)/shards \
		--split train --out $(DEMO)/retrieval/index

$(DEMO)/retrieval/example.html: $(DEMO)/retrieval/index/manifest.json
	$(STEP) 'retrieval eval' $(BIN)/radalign retrieval eval --index-dir $(DEMO)/retrieval/index --shards $(DEMO)/shards \
		--split test --out $(DEMO)/retrieval
	$(STEP) 'retrieval search' $(BIN)/radalign retrieval search --index-dir $(DEMO)/retrieval/index \
		--example-from $(DEMO)/shards --split test --k 5 --out $(DEMO)/retrieval/example.html \
		--out $(DEMO)/retrieval/example.md

# The index as a classifier (k-NN vote, temperature fitted on validate) beside prompt zero-shot, paired.
$(DEMO)/retrieval/classify/metrics.json: $(DEMO)/retrieval/index/manifest.json
	$(STEP) 'retrieval classify' $(BIN)/radalign retrieval classify --index-dir $(DEMO)/retrieval/index \
		--shards $(DEMO)/shards --split test --val-split validate --prompts chexpert14 --export $(DEMO)/pretrain \
		--blank negative --out $(DEMO)/retrieval/classify

$(IHM)/metrics.json: $(DEMO)/ehr/manifest.json $(DEMO)/pretrain/export/config.json
	$(STEP) 'finetune (in-hospital mortality)' $(BIN)/radalign finetune --config finetune/in_hospital_mortality \
		run_dir=$(IHM) $(FT_DATA)

$(IHM)/eval/metrics.json: $(IHM)/metrics.json
	$(STEP) 'finetune eval' $(BIN)/radalign finetune eval --run $(IHM) --split test --out $(IHM)/eval

# The explained study: the test study with the highest fusion risk (any other id works the same way).
$(IHM)/explain.html: $(IHM)/eval/metrics.json $(DEMO)/retrieval/index/manifest.json
	$(eval STUDY := $(shell $(BIN)/python -c "import pandas as p; d=p.read_csv('$(IHM)/predictions.csv'); print(d.loc[d['score:fusion'].idxmax(), 'study_id'])"))
	$(STEP) 'finetune explain' $(BIN)/radalign finetune explain --run $(IHM) --study-id $(STUDY) \
		--index-dir $(DEMO)/retrieval/index --out $(IHM)/explain.json --out $(IHM)/explain.md --out $(IHM)/explain.html

$(FT)/fewshot_pneumothorax/fewshot.json: $(DEMO)/ehr/manifest.json $(DEMO)/pretrain/export/config.json
	$(STEP) 'finetune few-shot' $(BIN)/radalign finetune fewshot --config finetune/fewshot_pneumothorax \
		run_dir=$(FT)/fewshot_pneumothorax $(FT_DATA)

# --- mutate (owner: H6 mutation; not in CI) -------------------------------------------------------------
# Mutation testing with mutmut 3 of the modules whose bugs change numbers (tools/mutate.py has the module ->
# tests map). Writes the score per module to docs/testing.md. Narrow it: make mutate MUTATE_ARGS="--stable
# --max-mutants 60" or MUTATE_ARGS="data/sections.py".
MUTATE_ARGS ?=

mutate: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(PIP) install -q -c constraints.txt "mutmut>=3.8,<4"
	nice -n 19 $(BIN)/python tools/mutate.py $(MUTATE_ARGS)
# --- end mutate ---------------------------------------------------------------------------------------------

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
