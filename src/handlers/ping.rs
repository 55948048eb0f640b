//! `ping`: a handler for smoke checks and tests. It sleeps `sleep_sec` in ten steps
//! (reporting progress when `progress = true` and checkpointing each step, so a retry
//! resumes), fails its first `fail_times` attempts (fatally with `fatal = true`), and
//! returns what it did.

use std::time::Duration;

use super::{HandlerError, TaskContext};

const STEPS: u64 = 10;

/// Runs one attempt of `ping`.
pub(crate) fn run(ctx: &TaskContext) -> Result<serde_json::Value, HandlerError> {
    let sleep_sec = ctx.param_f64("sleep_sec", 0.0)?;
    let fail_times = ctx.param_u64("fail_times", 0)?;
    let progress = ctx.param_bool("progress", false)?;
    let fatal = ctx.param_bool("fatal", false)?;
    if !(0.0..=86_400.0).contains(&sleep_sec) {
        return Err(HandlerError::Fatal(format!(
            "params.sleep_sec: expected 0 to 86400 seconds, found {sleep_sec}"
        )));
    }
    let resumed_from = ctx
        .checkpoint()
        .and_then(|c| c.get("step"))
        .and_then(|s| s.as_u64())
        .unwrap_or(0)
        .min(STEPS);
    let step = Duration::from_secs_f64(sleep_sec / STEPS as f64);
    for done in resumed_from..STEPS {
        std::thread::sleep(step);
        if progress {
            ctx.progress(((done + 1) * 100 / STEPS) as f64, "sleeping");
        }
        ctx.save_checkpoint(serde_json::json!({ "step": done + 1 }));
    }
    println!(
        "ping: task {} run {} attempt {} slept {sleep_sec}s",
        ctx.task(),
        ctx.run_id(),
        ctx.attempt()
    );
    if u64::from(ctx.attempt()) <= fail_times {
        let message = format!(
            "ping: failing attempt {} of the first {fail_times} on purpose",
            ctx.attempt()
        );
        return Err(if fatal {
            HandlerError::Fatal(message)
        } else {
            HandlerError::Retryable(message)
        });
    }
    Ok(serde_json::json!({
        "slept_sec": sleep_sec,
        "attempt": ctx.attempt(),
        "resumed_from_step": resumed_from,
    }))
}
