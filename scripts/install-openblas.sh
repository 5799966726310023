#!/usr/bin/env bash
# Installs OpenBLAS (Debian's libopenblas0-pthread) when no CBLAS library loads, so the CPU
# layer's GEMM can use it (svft::cpu::blas; SVFT_GEMM=auto takes it when present). Idempotent;
# needs root (or sudo) only when it has something to install. Prints the library it found.
set -euo pipefail
found() { /sbin/ldconfig -p 2>/dev/null | grep -o '/[^ ]*libopenblas\.so\.0$' | head -n 1; }
lib="$(found || true)"
if [[ -z "$lib" ]]; then
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; }
  lib="$(found)"
fi
echo "$lib"
