# als: make demo (the main job, end to end), make test (the suite) and make test-fast (its tier without real parts).
PYTHON ?= python3
APT_PACKAGES = fuse3 podman runc docker-registry containerd stargz-snapshotter apache2-utils busybox-static python3 uidmap systemd debootstrap
PYTEST_ARGS ?=

SYSTEMD_UNIT_DIR ?= /etc/systemd/system
CONFIG_DIR ?= /etc/als
DOC_DIR ?= /usr/share/doc/als
DESTDIR ?=

.PHONY: deps demo test test-fast test-podman5 podman5-chroots soak bench install install-files clean

# Install what the demo and the tests need: Debian packages (as root) and the package itself.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(PYTHON) -c 'import importlib.metadata as m; m.version("als"); import requests, zstandard, isal, indexed_gzip, cachetools, prometheus_client, pytest, hypothesis, cryptography, yaml' 2>/dev/null || \
		$(PYTHON) -m pip install -q --root-user-action=ignore -e '.[test]'

# Start a registry, push a small eStargz image, serve it with `als serve`, run it with Podman.
demo: deps
	$(PYTHON) -m tests.support.demo

test: deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The tier without real parts (no registry process, FUSE mount, Podman or root): the store and its file
# system in-process over an in-memory registry, and the unit tests; well under a minute on 2 cores.
# Tests are marked `real` from their code (tests/support/tiers.py); docs/testing.md describes the tiers.
test-fast: deps
	$(PYTHON) -m pytest -m "not real" $(PYTEST_ARGS)

# The Podman 5 tier alone: Debian trixie's Podman 5.4 and sid's 5.8 from chroots the suite builds
# once with debootstrap and keeps in /var/tmp/als-podman5 (part of `make test` too).
test-podman5: deps
	$(PYTHON) -m pytest tests/system/test_podman5.py tests/system/test_podman5_harness.py tests/system/test_podman5_gzindex.py $(PYTEST_ARGS)

# Build those chroots ahead (about a minute each), or say that they are there.
podman5-chroots: deps
	$(PYTHON) -m tests.support.podman5

# Long hostile-input, fault, crash and load runs (tens of minutes); figures are printed.
soak: deps
	$(PYTHON) -m pytest -m soak -s $(PYTEST_ARGS)

# The package, the systemd unit (ExecStart = the installed `als`), a sample config if none exists.
install: deps
	$(PYTHON) -m pip install -q --root-user-action=ignore .
	$(MAKE) --no-print-directory install-files
	@if [ -d /run/systemd/system ] && [ -z "$(DESTDIR)" ]; then systemctl daemon-reload; fi
	@echo "next: systemctl enable --now als.service, then add \"/var/lib/als/store:ref\" to additionallayerstores (README: Operating als)"

install-files:
	@bin="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/als"; \
	install -d -m 0755 "$(DESTDIR)$(SYSTEMD_UNIT_DIR)" "$(DESTDIR)$(DOC_DIR)"; \
	sed "s|/usr/local/bin/als|$$bin|" contrib/systemd/als.service > "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/als.service"; \
	chmod 0644 "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/als.service"; \
	install -m 0644 README.md "$(DESTDIR)$(DOC_DIR)/README.md"; \
	echo "installed $(DESTDIR)$(SYSTEMD_UNIT_DIR)/als.service (ExecStart=$$bin)"; \
	if [ -e "$(DESTDIR)$(CONFIG_DIR)/config.toml" ]; then \
		echo "kept $(DESTDIR)$(CONFIG_DIR)/config.toml"; \
	else \
		install -D -m 0644 config/config.toml "$(DESTDIR)$(CONFIG_DIR)/config.toml"; \
		echo "installed $(DESTDIR)$(CONFIG_DIR)/config.toml"; \
	fi

clean:
	rm -rf build dist *.egg-info .pytest_cache

# What users run, side by side, over an emulated 20 ms / 200 Mbit/s link: a normal pull, als as shipped
# (on the eStargz image, and on the gzip image indexed by `als index`), als with the background fetch off
# (extra) and the reference store, stargz-store, which is built here with Debian's Go from a
# stargz-snapshotter source tree when one is there (tests/support/bench_stargz.py; Debian packages no
# stargz-store) and otherwise left out, saying why. About 17 minutes on 2 cores.
BENCH_APT_PACKAGES = golang-go golang-github-containerd-stargz-snapshotter-dev golang-k8s-klog-dev \
	golang-k8s-utils-dev golang-k8s-sigs-json-dev golang-k8s-sigs-structured-merge-diff-dev golang-k8s-sigs-yaml-dev
bench: deps
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the reference store:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PYTHON) -m tests.support.bench $(BENCH_ARGS)
