//! The `coven` binary: everything lives in the library so tests can drive it.

// jemalloc keeps a replica's memory per open connection lower than glibc's malloc
// (measured in benches/stream.rs; see the README's figures).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    coven::cli::main()
}
