# als: make demo (the main job, end to end) and make test (the suite).
PYTHON ?= python3
APT_PACKAGES = fuse3 podman runc docker-registry containerd stargz-snapshotter apache2-utils busybox-static python3 uidmap
PYTEST_ARGS ?=

.PHONY: deps demo test test-fast bench install clean

# Install what the demo and the tests need: Debian packages (as root) and the package itself.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(PYTHON) -c 'import importlib.metadata as m; m.version("als"); import fuse, requests, zstandard, cachetools, pytest, hypothesis, cryptography' 2>/dev/null || \
		$(PYTHON) -m pip install -q --root-user-action=ignore -e '.[test]'

# Start a registry, push a small eStargz image, serve it with `als serve`, run it with Podman.
demo: deps
	$(PYTHON) -m tests.support.demo

test: deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Everything but the slow end-to-end Podman tests.
test-fast: deps
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

install: deps
	$(PYTHON) -m pip install -q --root-user-action=ignore .

clean:
	rm -rf build dist *.egg-info .pytest_cache
