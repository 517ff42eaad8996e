# ST-V-Net femur segmentation: one-command training, tests and tools.
# Variables a user can pass:  make train EXPERIMENT=experiments/vnet.yaml DATA=my_manifest.csv FOLD=2 COHORT=female MAX_EPOCHS=50 OUT=runs
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The torch version is pinned once, in pyproject.toml; installed first from the CPU index when there is one.
# GPU users: environment.yml, or make TORCH_SPEC="$(TORCH_PIN) --index-url https://download.pytorch.org/whl/cu126"
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
TORCH_SPEC ?= $(TORCH_PIN)
EXPERIMENT ?= experiments/stvnet.yaml
DATA ?=
FOLD ?= 0
COHORT ?= all
MAX_EPOCHS ?=
OUT ?= runs
ARGS ?=
# make test's pytest-xdist workers (each gets its share of the cores; the multiprocess suite runs one at a time)
TEST_WORKERS ?= 2

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TRAIN_ARGS := --config $(EXPERIMENT) --data.fold $(FOLD) --data.cohort $(COHORT) --run.out $(OUT)
ifneq ($(strip $(DATA)),)
TRAIN_ARGS += --data.manifest $(DATA)
endif
ifneq ($(strip $(MAX_EPOCHS)),)
TRAIN_ARGS += --trainer.max_epochs $(MAX_EPOCHS)
endif

SPACE ?= sweeps/vnet.yaml
TRIALS ?= 4
ABLATE_FOLDS ?= 0
ABLATE_EPOCHS ?= 10

# the V-Net vs ST-V-Net verdict: both models x VERDICT_FOLDS x VERDICT_SEEDS on a VERDICT_SUBJECTS cohort, every subject
# outside the test set validated by the fold that held it out, the test set by every run
VERDICT_SUBJECTS ?= 100
VERDICT_FOLDS ?= 0 1 2 3 4 5 6 7 8 9
VERDICT_SEEDS ?= 0 1
VERDICT_EPOCHS ?= 24
VERDICT_JOBS ?= 1
VERDICT_COHORT := data/verdict-v4-$(VERDICT_SUBJECTS)

# make train-long: the same experiment for LONG_EPOCHS (stage lengths scale with it): the longer CPU run
LONG_EPOCHS ?= 72

.PHONY: install train train-long test test-multiprocess wheel-check lint-imports docs mutate planted-bugs synth bench evaluate ablate verdict verdict-cpu sweep clean help

help:
	@echo "make train   train EXPERIMENT (default $(EXPERIMENT)) on fold FOLD of DATA (default: synthetic cohort)"
	@echo "make train-long   the same for LONG_EPOCHS (default $(LONG_EPOCHS)) epochs, the stages scaled with them"
	@echo "make test    run the in-process test suite (the import contracts included)"
	@echo "make test-multiprocess   DDP ranks, torchrun, sweeps, kill/resume and heavy tests (~12 min on 2 cores; CI runs both)"
	@echo "make mutate  mutation testing (mutmut) of the modules in [tool.mutmut]; score in mutation/score.md"
	@echo "make planted-bugs   plant the bugs that once slipped through, one at a time; each must fail a test"
	@echo "make synth   write the synthetic cohort to data/synthetic-v4"
	@echo "make ablate  V-Net vs ST-V-Net x all/male/female x ABLATE_FOLDS, then evaluate + compare"
	@echo "make verdict V-Net vs ST-V-Net, 10 folds x 2 seeds, paired tests, effect sizes, hard cases (OUT/verdict/report.md)"
	@echo "make verdict-cpu   the same study sized for 2 CPU cores (40 subjects, 48^3 ROIs, 40 epochs; OUT/cpu/verdict)"
	@echo "make sweep   Optuna search (SPACE, TRIALS); best.yaml + plots under OUT/sweeps/<study>"
	@echo "make bench   benchmark against MONAI (ratios) and the ceiling of each experiment's ROI grid, in bench_results/bench.md"
	@echo "make evaluate RUNS=\"run1 run2\"   paper-style evaluation of trained runs"
	@echo "make wheel-check   build the wheel, install it into a clean venv and train one step outside the checkout"
	@echo "make lint-imports   check the import contracts of .importlinter (layers, no cycles)"
	@echo "make docs   build the documentation site into site/ (mkdocs --strict: a broken link fails)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/stvnet train $(TRAIN_ARGS) $(ARGS)

train-long: $(STAMP)
	$(BIN)/stvnet train $(TRAIN_ARGS) --trainer.max_epochs $(LONG_EPOCHS) $(ARGS)

synth: $(STAMP)
	$(BIN)/stvnet synth --out data/synthetic-v4

bench: $(STAMP)
	$(BIN)/stvnet bench --out bench_results/bench.md $(ARGS)

# make evaluate RUNS="runs/vnet/all/fold0/<time> runs/stvnet/all/fold0/<time>"
evaluate: $(STAMP)
	$(BIN)/stvnet evaluate $(RUNS) $(ARGS)

# Optuna: make sweep SPACE=sweeps/stvnet.yaml TRIALS=20 [ARGS="--storage postgresql://... --devices 4"]
sweep: $(STAMP)
	$(BIN)/stvnet sweep --space $(SPACE) --trials $(TRIALS) --out $(OUT)/sweeps $(ARGS)

# the sex-stratified study: {V-Net, ST-V-Net} x {all, male, female} x ABLATE_FOLDS (GPU users: ABLATE_FOLDS="0 1 2 3 4 5 6 7 8 9" ABLATE_EPOCHS=200)
ablate: $(STAMP)
	$(BIN)/stvnet ablate --folds $(ABLATE_FOLDS) --out $(OUT)/ablation -- --trainer.max_epochs $(ABLATE_EPOCHS) $(ARGS)

$(VERDICT_COHORT)/manifest.csv: | $(STAMP)
	$(BIN)/stvnet synth --out $(VERDICT_COHORT) --subjects $(VERDICT_SUBJECTS)

verdict: $(STAMP) $(VERDICT_COHORT)/manifest.csv
	$(BIN)/stvnet ablate --configs experiments/vnet.yaml experiments/stvnet.yaml --cohorts all --folds $(VERDICT_FOLDS) \
		--seeds $(VERDICT_SEEDS) --splits val test --jobs $(VERDICT_JOBS) --out $(OUT)/verdict -- \
		--data.manifest $(VERDICT_COHORT)/manifest.csv --trainer.max_epochs $(VERDICT_EPOCHS) $(ARGS)

# the same study sized for a 2-core CPU machine: 40 subjects, 48^3 ROIs at 3.2 mm (a 154 mm box), 40 epochs, two
# cells at a time, under OUT/cpu (README: "The verdict on a CPU")
verdict-cpu: $(STAMP)
	$(MAKE) verdict VERDICT_SUBJECTS=40 VERDICT_EPOCHS=40 VERDICT_JOBS=2 OUT=$(OUT)/cpu \
		ARGS="--data.roi_size [48,48,48] --data.target_spacing [3.2,3.2,3.2] $(ARGS)"

# --durations: the slowest tests in every log (CI's included), so a test that grows shows where the time went
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not multiprocess and not heavy and not slow" -n $(TEST_WORKERS) --dist loadfile \
		--durations=15 $(ARGS)

# multi-process (DDP ranks, training subprocesses), heavy (clinical-size scans, whole benchmark runs) and slow
# (each config, predict, evaluate and bf16 trained end to end) tests
test-multiprocess: $(STAMP)
	$(BIN)/python -m pytest -q -m "multiprocess or heavy or slow" --durations=15 $(ARGS)

# the architecture's import contracts (.importlinter): layers, no cycles, the generator behind its entry point
# the package as installed from its wheel into a clean venv, run outside the checkout (packaged defaults found)
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh $(PYTHON) "$(TORCH_SPEC)"

lint-imports: $(STAMP)
	$(BIN)/lint-imports

# the documentation site (mkdocs.yml): the README as its home page, the references generated from the parsers
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# mutation testing ([tool.mutmut] in pyproject.toml names the modules); mutation/survivors.md explains the survivors
mutate: $(STAMP)
	$(BIN)/python -m pip install --quiet "mutmut==3.8.1"
	rm -rf mutants mutants-cohort mutants-runs mutants-runs-cache mutants-log.tsv
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 STVNET_TEST_COHORT_CACHE=$(CURDIR)/mutants-cohort STVNET_TEST_RUNS_CACHE=$(CURDIR)/mutants-runs STVNET_MUTATION_LOG=$(CURDIR)/mutants-log.tsv $(BIN)/mutmut run --max-children $$(nproc) || true
	mkdir -p mutation
	$(BIN)/mutmut results --all true > mutation/results.txt
	$(BIN)/python mutation/score.py mutants-log.tsv < mutation/results.txt | tee mutation/score.md
	$(BIN)/python mutation/survivors.py mutation/results.txt mutation/survivors.tsv

planted-bugs: $(STAMP)
	$(BIN)/python mutation/planted_bugs.py

clean:
	rm -rf site runs outputs wandb lightning_logs .pytest_cache mutants mutants-cohort mutants-runs mutants-runs-cache mutants-log.tsv
