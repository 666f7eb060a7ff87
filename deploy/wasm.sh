#!/bin/sh
# Build the WebAssembly handlers (examples/wasm, tests/wasm) into build/wasm, from Debian's packages:
# clang with the wasm32-wasi target, wasi-libc and lld; the .wat one with wasmtime's wat2wasm (PyPI).
set -eu
PY=${PY:-.venv/bin/python}
OUT=build/wasm
if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null || [ ! -f /usr/include/wasm32-wasi/stdio.h ] \
   || ! ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
  echo "installing clang lld wasi-libc libclang-rt-14-dev-wasm32 with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang lld wasi-libc \
    libclang-rt-14-dev-wasm32 >/dev/null
fi
mkdir -p "$OUT"
for src in examples/wasm/*.c tests/wasm/*.c; do
  out="$OUT/$(basename "$src" .c).wasm"
  if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
    clang --target=wasm32-wasi -O2 -Wall -Werror -o "$out" "$src"
  fi
done
for src in examples/wasm/*.wat; do
  out="$OUT/$(basename "$src" .wat)-wat.wasm"
  if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
    "$PY" -c "import sys, wasmtime; open(sys.argv[2], 'wb').write(wasmtime.wat2wasm(open(sys.argv[1]).read()))" \
      "$src" "$out"
  fi
done
ls "$OUT"
