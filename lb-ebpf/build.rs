use which::which;

/// Rebuild when bpf-linker changes: it is an input to the object file even
/// though cargo cannot see it.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
