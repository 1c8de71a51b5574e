//! The `tenant-tokens` binary as an operator runs it: one command to completion, its exit code
//! and output, off the test's runtime threads (a worker may be running in-process meanwhile).

use super::workers::worker_binary;

/// What a finished command printed, and how it exited.
#[derive(Debug)]
pub struct CommandOutput {
    /// The exit code (`None` if a signal ended it).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `tenant-tokens ARGS` with exactly the environment `env` (plus text logs at `warn`).
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> CommandOutput {
    let mut cmd = std::process::Command::new(worker_binary());
    cmd.args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("LOG_FORMAT", "pretty")
        .env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("command task")
        .expect("run tenant-tokens");
    CommandOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
