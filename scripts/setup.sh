#!/usr/bin/env bash
# One-shot set-up on a fresh Debian machine: system packages, then .venv/ with every Python dependency.
# Called by `make setup`; safe to re-run (each step skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
APT_PACKAGES=(dataset-fashion-mnist)   # Fashion-MNIST, the bundled default dataset (never downloaded)

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
# torch/torchvision resolve from this machine's local wheel cache (pinned in pyproject.toml). pip's warnings about
# the machine's empty local index folders ("... is ignored: it is neither a file nor a directory") are filtered.
.venv/bin/pip install -q -e '.[dev,sweep]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv/bin/python -c "import vittm, timm, lightning, hydra; print('setup: ok,', len(timm.list_models('vittm*')), 'ViTTM models')"
