//! The `tenant-tokens` binary: everything lives in the library; see [`tenant_tokens::cli`].

fn main() -> std::process::ExitCode {
    tenant_tokens::cli::main()
}
