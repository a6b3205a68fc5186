//! With `ROCKSDB_STATIC` set, RocksDB links from Debian's `librocksdb.a`,
//! which leaves the compression libraries it was built with to the final
//! link. Static linking saves a few milliseconds of dynamic relocation on
//! every `strata` invocation (measured in docs/dependencies.md).
fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    if std::env::var_os("ROCKSDB_STATIC").is_some() {
        for lib in ["snappy", "lz4", "zstd", "bz2", "z"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
}
