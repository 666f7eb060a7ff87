;; The hello handler in WebAssembly text, the second language: built with wasmtime's wat2wasm (PyPI).
;; It writes a CGI response to stdout with WASI's fd_write and returns from _start.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\r\n\r\nhello from wat\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))   ;; iovec.base
    (i32.store (i32.const 4) (i32.const 43))   ;; iovec.len
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))
