# Two commands on a fresh machine: `make run` (the embedded default) and `make test`.
# Both create .venv with pip when it is missing and install the project into it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Extra arguments for snakemake, e.g. `make run ARGS="-n"`.
ARGS ?=

# The Slurm test kit (a real single-node cluster; needs root, installs Debian's Slurm packages).
SLURM_KIT ?= $(abspath ../shared/slurm)

.PHONY: install run test test-slurm lint report clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision pinned to the wheels the machine already has (CPU and CUDA alike).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	snakemake --profile profiles/local all $(ARGS)

test: install
	pytest -q tests $(ARGS)

test-slurm: install
	SAEV_SLURM_KIT=$(SLURM_KIT) timeout -s KILL 1800 pytest -q tests/test_slurm.py $(ARGS)

lint: install
	ruff check saev_core tests benchmarks
	ruff format --check saev_core tests benchmarks
	snakefmt --check Snakefile workflow/rules
	snakemake --lint

report: install
	snakemake --report results/report.html

clean:
	rm -rf results .snakemake
