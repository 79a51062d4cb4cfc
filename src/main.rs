//! The `dolly` command; everything is in the runtime crate.

fn main() {
    std::process::exit(runtime::cli::main());
}
