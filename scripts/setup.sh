#!/usr/bin/env bash
# Installs what building and testing need, idempotently, and exports the
# build environment. Sourced by scripts/run-tests and scripts/run-demo.
#
# - Debian packages: libclang-dev (RocksDB's bindings are generated at build
#   time), clang, iproute2 (network namespaces for the chaos suite),
#   chromium and chromium-driver (the dashboard's browser test), gdb (the
#   chaos suite's stack dumps of a stuck replica), patchelf (a Python every
#   user can run, below).
# - The real `slapos` client (PyPI slapos.core 1.26.1) in a Python 3.12 venv,
#   for the conformance tests, and beside it the recipes of the buildout
#   release those tests deploy (software/buildout-hello/recipe, and
#   slapos.cookbook from PyPI).
#   protoc is not needed: it comes vendored with the protoc-bin-vendored crate.
# - CARGO_TARGET_DIR defaults to /var/tmp/slapos-target, outside the checkout,
#   so RocksDB's C++ (about 30 minutes cold on 2 cores) is compiled once per
#   machine, not once per clone.

set -euo pipefail

need_pkgs=()
for pkg in libclang-dev clang iproute2 chromium chromium-driver gdb patchelf; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$pkg")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH; install Rust (rustup) first" >&2
  exit 1
fi

# The unmodified SlapOS client (slapos.core 1.26.1, which needs Python 3.12
# or newer) for the conformance tests, in a venv outside the checkout.
#
# `slapos node` runs buildout and the instances' services as unprivileged
# users, so the venv's interpreter must run for them too. pyenv's Python
# lives under /root (mode 0700) and finds its libpython through an absolute
# RUNPATH there: it is copied to /var/tmp/slapos-python (readable by all)
# with its RUNPATH made relative ($ORIGIN, patchelf), and the venv is built
# from the copy.
export SLAPOS_VENV="${SLAPOS_VENV:-/var/tmp/slapos-venv}"
runs_unprivileged() {
  [ "$(id -u)" -ne 0 ] || runuser -u nobody -- "$1" -c pass >/dev/null 2>&1
}
if [ ! -x "$SLAPOS_VENV/bin/slapos" ] || ! runs_unprivileged "$SLAPOS_VENV/bin/python"; then
  py="${SLAPOS_PYTHON:-}"
  if [ -z "$py" ]; then
    # A pyenv shim exists for every installed version but fails unless that
    # version is active, so each candidate must actually run and be >= 3.12.
    for candidate in python3.13 python3.12 \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3.1[2-9] \
        /root/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9]; do
      if command -v "$candidate" >/dev/null 2>&1 &&
          "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
        py=$(command -v "$candidate"); break
      fi
    done
  fi
  if [ -z "$py" ]; then
    echo "setup: the slapos client needs Python 3.12 or newer and none was found;" >&2
    echo "       install one (e.g. pyenv install 3.12) or set SLAPOS_PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  if ! runs_unprivileged "$py"; then
    prefix=$("$py" -c 'import sys; print(sys.base_prefix)')
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    copy=/var/tmp/slapos-python
    echo "setup: $py cannot run as an unprivileged user; copying $prefix to $copy"
    rm -rf "$copy"
    cp -a "$prefix" "$copy"
    chmod -R a+rX "$copy"
    patchelf --set-rpath '$ORIGIN/../lib' "$copy/bin/python$version"
    py="$copy/bin/python$version"
    if ! runs_unprivileged "$py"; then
      echo "setup: $py still cannot run as user nobody; set SLAPOS_PYTHON to a Python 3.12+ every user can run" >&2
      exit 1
    fi
  fi
  echo "setup: installing slapos.core 1.26.1 into $SLAPOS_VENV with $py"
  rm -rf "$SLAPOS_VENV"
  "$py" -m venv "$SLAPOS_VENV"
  "$SLAPOS_VENV/bin/pip" install -q slapos.core==1.26.1 slapos.libnetworkcache
  chmod -R a+rX "$SLAPOS_VENV"
fi
export SLAPOS_BIN="$SLAPOS_VENV/bin/slapos"

# The recipes of software/buildout-hello, the buildout release that
# `slapos node` deploys in the slapgrid conformance test, go beside slapgrid
# (buildout finds them there, offline). Built with the venv's own
# setuptools (nothing downloaded), from a copy so the checkout stays clean;
# reinstalled whenever their source changes.
recipe_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/software/buildout-hello/recipe"
recipe_sum=$(cat "$recipe_src/pyproject.toml" "$recipe_src"/slapos_rs_recipe/*.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$SLAPOS_VENV/.slapos-rs-recipe.sha256" 2>/dev/null)" != "$recipe_sum" ]; then
  echo "setup: installing the buildout recipes of software/buildout-hello into $SLAPOS_VENV"
  recipe_tmp=$(mktemp -d)
  cp -r "$recipe_src/." "$recipe_tmp"
  "$SLAPOS_VENV/bin/pip" install -q --no-build-isolation --no-deps --force-reinstall "$recipe_tmp"
  rm -rf "$recipe_tmp"
  echo "$recipe_sum" >"$SLAPOS_VENV/.slapos-rs-recipe.sha256"
fi

# SlapOS's own recipes (slapos.cookbook, from PyPI with its dependencies):
# the buildout release uses its slapconfiguration and publish recipes, as
# real SlapOS releases do.
cookbook_version=1.0.514
if ! "$SLAPOS_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('slapos.cookbook') != '$cookbook_version')" 2>/dev/null; then
  echo "setup: installing slapos.cookbook $cookbook_version into $SLAPOS_VENV"
  "$SLAPOS_VENV/bin/pip" install -q "slapos.cookbook==$cookbook_version"
  chmod -R a+rX "$SLAPOS_VENV"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/slapos-target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
