#!/usr/bin/env bash
# The wheels that the device tool's GPU machine (python 3.12, torch with CUDA, transformers, no diffusers,
# no web server) lacks for benchmarks/bench_gpu.py, downloaded here into .whl/ (ignored by git), at the
# versions installed in this checkout's environment (fastapi imports opentelemetry-api when imported;
# pydantic-core needs typing-extensions >= 4.16, newer than the image may hold). Then pass
# `carry: [".whl"]` to the device tool and start its command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES="diffusers importlib-metadata ftfy wcwidth torchsde trampoline piexif
fastapi opentelemetry-api starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions
uvicorn python-multipart"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl  # wheels of older versions would clash with the new ones in pip's install
mkdir -p .whl
for name in $PACKAGES; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls -la .whl
du -sh .whl
