#!/usr/bin/env bash
# timm's own model test-suite (tests/test_models.py of the pinned timm's source release, unmodified) run on every
# vittm_* entrypoint: `make timm-contract` (README "timm's model contract"). Fetches the sdist from the package
# index once into .build/; extra pytest arguments are passed through (e.g. -x, -q; to narrow the selection give the
# whole of it, since a later -k replaces this one: -k "vittm and fx").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VERSION=$($PY -c "import timm; print(timm.__version__)")
DEST=.build/timm-tests-$VERSION
if [ ! -f "$DEST/tests/test_models.py" ]; then
    tmp=$(mktemp -d)
    $PY -m pip download -q --no-binary :all: --no-deps "timm==$VERSION" -d "$tmp" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    mkdir -p "$DEST"
    # only the tests and timm's pytest settings (markers): the installed timm is the one under test
    tar -xzf "$tmp/timm-$VERSION.tar.gz" -C "$DEST" --strip-components=1 "timm-$VERSION/tests" \
        "timm-$VERSION/pyproject.toml"
    rm -rf "$tmp"
fi
cd "$DEST"
HF_HUB_OFFLINE=1 PYTHONPATH="$OLDPWD/scripts/timm_contract${PYTHONPATH:+:$PYTHONPATH}" \
    "$OLDPWD/$PY" -m pytest tests/test_models.py -p vittm_timm_plugin -k vittm -p no:cacheprovider -rfE "$@"
