#!/usr/bin/env bash
# Installs what building and testing need, idempotently, and exports the
# build environment. Sourced by scripts/run-tests and scripts/run-demo.
#
# - Debian packages: libclang-dev (RocksDB's bindings are generated at build
#   time), clang, iproute2 (network namespaces for the chaos suite).
#   protoc is not needed: it comes vendored with the protoc-bin-vendored crate.
# - CARGO_TARGET_DIR defaults to /var/tmp/slapos-target, outside the checkout,
#   so RocksDB's C++ (about 30 minutes cold on 2 cores) is compiled once per
#   machine, not once per clone.

set -euo pipefail

need_pkgs=()
for pkg in libclang-dev clang iproute2; do
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

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/slapos-target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
