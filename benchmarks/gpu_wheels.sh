#!/usr/bin/env bash
# The wheels that a GPU host's image lacks for benchmarks/gpu_check.py (benchmarks/README.md, "gpu-check").
#
#   benchmarks/gpu_wheels.sh [DEST]        # DEST: .whl at the repository's root (git ignores it)
#
# Run where PyPI is reachable; DEST then travels with the checkout to a host that has no network, whose image has
# Python 3.12, its own CUDA build of torch and the common packages (numpy, pyyaml, transformers, torchmetrics,
# tabulate, pillow, psutil, requests, ...: the list in benchmarks/README.md), and is installed there with
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# --no-deps on both sides: Composer 0.32.1 pins torch<2.7.1 and Streaming numpy<2.2, and a resolver would replace the
# image's own torch and numpy. So this list is exactly Composer's and Streaming's wheels and what their imports need
# beyond the image, found by importing them with nothing else installed; pinned to the versions the repo's .venv has.
# Streaming imports torchvision, which the image has, built for its torch (a PyPI torchvision of another build fails
# to register its operators). PYTHON_VERSION= for another Python (3.12 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python_version=${PYTHON_VERSION:-3.12}
packages=(
  # prefix's own requirements that the image lacks
  mosaicml==0.32.1 mosaicml-streaming==0.13.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
  # what `import streaming` imports (its compression codecs, its registry, its vision datasets)
  brotli==1.2.1 python-snappy==0.7.3 cramjam==2.14.0 zstd==1.5.6.1 catalogue==2.0.10
  # what `import composer` imports: its own, and mosaicml-cli's (composer.loggers imports mcli); not zipp, which
  # importlib-metadata imports only to read zipped sys.path entries
  coolname==2.2.0 importlib-metadata==8.9.0 mosaicml-cli==0.7.5 backoff==2.2.1 gql==3.5.3 graphql-core==3.2.6
  websockets==11.0.3 ruamel.yaml==0.19.1 questionary==2.0.1 prompt-toolkit==3.0.36 wcwidth==0.9.5 validators==0.36.0
)
mkdir -p "$dest"
"${PIP_PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dest" "${packages[@]}"
du -ch "$dest"/*.whl | tail -n 1
