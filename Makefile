# safedeploy — the two set-up commands:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
SD     := $(VENV)/bin/safedeploy
PYTEST ?= $(PY) -m pytest

.PHONY: setup host venv test test-unit test-installed demo bench dist deb clean

setup: host venv

host:            ## apt packages, kernel headers for bcc, bpffs, podman config (idempotent, root)
	@bash packaging/setup-host.sh

venv: $(VENV)/.installed

# the venv sees the OS's bcc (python3-bpfcc) through --system-site-packages
$(VENV)/.installed: pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

test: setup      ## every test, real kernel and runtimes included
	$(PYTEST) tests

test-unit: venv
	$(PYTEST) tests/unit

test-installed: setup dist   ## the suite against the installed wheel (no checkout on sys.path)
	bash packaging/test-installed.sh

demo: setup      ## a deploy script under a real policy, report printed
	$(SD) demo

bench: setup
	$(PY) bench/run_all.py

dist: venv       ## the wheel (kernel sources, schema, hooks.d templates, example policies inside)
	rm -f dist/safedeploy-*.whl
	$(PY) -m pip wheel -q --no-deps -w dist .

deb: dist        ## dist/safedeploy_<version>_all.deb, built with dpkg-deb (docs/install.md)
	$(PY) packaging/deb/build.py --wheel dist/safedeploy-*.whl --out dist

clean:
	rm -rf $(VENV) build dist *.egg-info
