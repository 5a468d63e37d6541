#!/usr/bin/env bash
# The test suite against the installed wheel, not the checkout (`make test-installed`):
# a fresh --system-site-packages venv with dist/safedeploy-*.whl, the tests copied into a temp
# dir (so no checkout is on sys.path), pytest run there. The wheel- and .deb-install tests
# build from the checkout and are left out here (`make test` runs them). Arguments go to
# pytest (default: tests), e.g. packaging/test-installed.sh -q tests/unit.
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(ls dist/safedeploy-*.whl)
tmp=$(mktemp -d /tmp/safedeploy-installed.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$wheel[test]"
cp -r tests pyproject.toml "$tmp/"
cd "$tmp"
where=$(venv/bin/python -c 'import ocihook, os; print(os.path.dirname(ocihook.__file__))')
echo "test-installed: ocihook from $where" >&2
case "$where" in "$tmp/venv/"*) ;; *) echo "test-installed: not the installed package" >&2; exit 1;; esac
[ $# -gt 0 ] || set -- tests
exec venv/bin/python -m pytest -p no:cacheprovider "$@" \
    --deselect tests/runtime/test_wheel_install.py --deselect tests/runtime/test_deb_install.py
