#!/bin/bash
# A venv in which `jaxlab bench kernels --compile` compiles the Pallas decode step for an
# H100 on a machine with no GPU (XLA's deviceless compilation; docs/kernels.md).
# It is the dev install plus the CUDA PJRT plugin of the same jaxlib, without the NVIDIA
# runtime wheels (nothing runs on a GPU). Kept apart from the dev venv: with the plugin
# installed, every JAX process on a GPU-less machine would log the plugin's failed start.
#   bash scripts/cuda_aot_venv.sh [VENV]          (default: .venv-cuda-aot)
#   VENV/bin/jaxlab bench kernels --compile --variants pallas,pallas-mlp2k
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-cuda-aot}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e .
V=$("$VENV/bin/python" -c "import jaxlib; print(jaxlib.__version__)")
"$VENV/bin/pip" install -q --no-deps "jax-cuda13-plugin==$V" "jax-cuda13-pjrt==$V"
if ! command -v ptxas > /dev/null; then
  echo "note: no ptxas on PATH; Mosaic GPU needs it (CUDA 13 toolkit, or" \
       "pip install nvidia-cuda-nvcc and put its bin/ on PATH)" >&2
fi
echo "ready: $VENV/bin/jaxlab bench kernels --compile --help"
