#!/usr/bin/env bash
# Install everything rbn needs on a Debian/Ubuntu machine: the Fashion-MNIST data package, graphviz (for the
# autograd-graph drawings), g++ (the native training step compiles on first use), and the package itself with its
# development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
missing=""
for p in dataset-fashion-mnist graphviz g++; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
python3 -m pip install -q -e ".[dev]"
