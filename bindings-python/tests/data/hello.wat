;; A WASI command for the Python tests: writes "hello from wasi\n" to stdout and
;; "oops\n" to stderr, then exits with status 3. hello.wasm is this file compiled
;; (wat::parse_str, the wat crate).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "hello from wasi\n")
  (data (i32.const 200) "oops\n")
  (func (export "_start")
    ;; iovec at 0: { ptr = 100, len = 16 }
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; iovec at 16: { ptr = 200, len = 5 }
    (i32.store (i32.const 16) (i32.const 200))
    (i32.store (i32.const 20) (i32.const 5))
    (drop (call $fd_write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 3))))
