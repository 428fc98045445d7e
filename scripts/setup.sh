#!/usr/bin/env bash
# Installs what building and testing need, idempotently, and exports the
# build environment. Sourced by scripts/run-tests and scripts/run-demo.
#
# - Debian packages: libclang-dev (RocksDB's bindings are generated at build
#   time), clang, iproute2 (network namespaces for the chaos suite),
#   chromium and chromium-driver (the dashboard's browser test), gdb (the
#   chaos suite's stack dumps of a stuck replica).
# - The real `slapos` client (PyPI slapos.core 1.26.1) in a Python 3.12 venv,
#   for the conformance tests.
#   protoc is not needed: it comes vendored with the protoc-bin-vendored crate.
# - CARGO_TARGET_DIR defaults to /var/tmp/slapos-target, outside the checkout,
#   so RocksDB's C++ (about 30 minutes cold on 2 cores) is compiled once per
#   machine, not once per clone.

set -euo pipefail

need_pkgs=()
for pkg in libclang-dev clang iproute2 chromium chromium-driver gdb; do
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
export SLAPOS_VENV="${SLAPOS_VENV:-/var/tmp/slapos-venv}"
if [ ! -x "$SLAPOS_VENV/bin/slapos" ]; then
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
  echo "setup: installing slapos.core 1.26.1 into $SLAPOS_VENV with $py"
  rm -rf "$SLAPOS_VENV"
  "$py" -m venv "$SLAPOS_VENV"
  "$SLAPOS_VENV/bin/pip" install -q slapos.core==1.26.1 slapos.libnetworkcache
fi
export SLAPOS_BIN="$SLAPOS_VENV/bin/slapos"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/slapos-target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
