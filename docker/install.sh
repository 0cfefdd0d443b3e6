#!/bin/sh
# Install brainage-xai and its dependencies into a new virtual environment.
#
# The Dockerfile's builder stage runs this, and tests/test_container.py replays it in a
# clean virtual environment, so that what the image installs is what the tests check.
#
# Usage: docker/install.sh VENV SRC
#   VENV  the virtual environment to create (e.g. /opt/venv)
#   SRC   the source tree (pyproject.toml, brainage_xai/, docker/constraints.txt)
# pip options come from the environment (the Dockerfile sets PIP_NO_CACHE_DIR=1).
# Environment:
#   TORCH_VARIANT    cuda (default: the PyPI build, CUDA 12 runtime bundled), cpu, or a
#                    PyTorch index tag such as cu126 / cu128
#   TORCH_VERSION    default 2.13.0 (the version the test suite runs with)
#   TORCH_INDEX_URL  the index torch comes from; default: PyPI for "cuda", else
#                    https://download.pytorch.org/whl/$TORCH_VARIANT; set it empty to use
#                    pip's configured index and find-links (a local wheel cache)
#   EXTRAS           optional extras of the package, comma-separated (tune, dask);
#                    default none
#   PYTHON           the interpreter that creates VENV (default python3)
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV SRC" >&2
    exit 2
fi
venv=$1
src=$2
TORCH_VARIANT=${TORCH_VARIANT:-cuda}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}

case "$TORCH_VARIANT" in
    cuda) default_index="" ;;
    cpu | cu[0-9]* | rocm[0-9]*) default_index="https://download.pytorch.org/whl/$TORCH_VARIANT" ;;
    *)
        echo "install.sh: TORCH_VARIANT must be cuda, cpu, cuXYZ or rocmX.Y; got '$TORCH_VARIANT'" >&2
        exit 2
        ;;
esac
# ${VAR-default}: an empty TORCH_INDEX_URL is a choice (pip's own configuration).
torch_index=${TORCH_INDEX_URL-$default_index}

"$PYTHON" -m venv "$venv"
pip="$venv/bin/python -m pip"

# torch alone first, from the index of the chosen variant; --no-deps so that its
# dependencies resolve from PyPI below, under the same constraints as everything else.
if [ -n "$torch_index" ]; then
    $pip install --no-deps --index-url "$torch_index" "torch==$TORCH_VERSION"
else
    $pip install --no-deps "torch==$TORCH_VERSION"
fi

# The package (with its BIDS validator), its dependencies and torch's, at the tested
# versions. Byte-code is
# compiled now: the image is read-only at run time.
package=$src
if [ -n "$EXTRAS" ]; then
    package="$src[$EXTRAS]"
fi
$pip install --constraint "$src/docker/constraints.txt" "$package"
$pip check

"$venv/bin/brainage-xai" --version
