#!/usr/bin/env bash
# One-shot set-up on a fresh Debian machine: system packages, then .venv/ with every Python dependency.
# Called by `make setup`; safe to re-run (each step skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
APT_PACKAGES=(
    dataset-fashion-mnist                         # Fashion-MNIST, the default dataset (never downloaded)
    pkg-config g++                                # FFCV's build finds its libraries with pkg-config
    libopencv-core-dev libopencv-imgproc-dev      # the two OpenCV 4 modules FFCV uses (not all ~200 packages)
    libturbojpeg0-dev                             # turbojpeg.h / libturbojpeg.pc for FFCV's JPEG decoder
)

missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (vittm needs Python 3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# FFCV's setup.py asks pkg-config for "opencv4", which only the full libopencv-dev (~200 packages) provides. A
# two-file shim describes the core + imgproc modules installed above (all that FFCV's C++ uses) instead.
SHIM=$PWD/.build/opencv-shim
mkdir -p "$SHIM/include/opencv2"
printf '#include <opencv2/core.hpp>\n#include <opencv2/imgproc.hpp>\n' > "$SHIM/include/opencv2/opencv.hpp"
cat > "$SHIM/opencv4.pc" <<PC
Name: OpenCV
Description: OpenCV core + imgproc, for FFCV
Version: 4.6.0
Libs: -lopencv_imgproc -lopencv_core
Cflags: -I$SHIM/include -I/usr/include/opencv4
PC

# torch/torchvision resolve from this machine's local wheel cache (pinned in pyproject.toml). pip's warnings about
# the machine's empty local index folders ("... is ignored: it is neither a file nor a directory") are filtered.
quiet_pip() { .venv/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! PKG_CONFIG_PATH="$SHIM" quiet_pip -e '.[dev,sweep,ffcv]'; then
    echo "setup: the FFCV extra did not build; installing without it. The torchvision data path, the default run" \
         "and every test not marked 'ffcv' work without it. To retry: PKG_CONFIG_PATH=$SHIM .venv/bin/pip install" \
         "-e '.[ffcv]' (needs the apt packages above)." >&2
    quiet_pip -e '.[dev,sweep]'
fi
.venv/bin/python -c "import vittm, timm, lightning, hydra; print('setup: ok,', len(timm.list_models('vittm*')), 'ViTTM models')"
.venv/bin/python -c "import ffcv" 2>/dev/null && echo "setup: FFCV $(.venv/bin/pip show ffcv 2>/dev/null | awk '/^Version/{print $2}') ready" \
    || echo "setup: FFCV not available (data=ffcv needs it)"
