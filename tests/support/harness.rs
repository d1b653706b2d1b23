//! A libtest-mimic harness whose trials share one control plane.
//!
//! Each feature file exports `pub fn cases() -> Vec<Case>`; a test binary's `main` passes all of
//! them to [`run`], which starts the control plane once (only if some trial will actually run),
//! runs the trials in parallel like libtest, and tears the control plane down before exiting.

use std::future::Future;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Trial};

use super::ControlPlane;

type Body = Box<dyn FnOnce(&'static ControlPlane) -> anyhow::Result<()> + Send>;

/// A named test body that gets the shared control plane; returning an error fails the trial.
pub struct Case {
    name: String,
    body: Body,
}

impl Case {
    /// An async test; it runs on a multi-thread runtime of its own, dropped when it ends.
    pub fn tokio<F, Fut>(name: impl Into<String>, body: F) -> Case
    where
        F: FnOnce(&'static ControlPlane) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        Case::blocking(name, move |cp| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(body(cp))
        })
    }

    /// A plain blocking test.
    pub fn blocking<F>(name: impl Into<String>, body: F) -> Case
    where
        F: FnOnce(&'static ControlPlane) -> anyhow::Result<()> + Send + 'static,
    {
        Case {
            name: name.into(),
            body: Box::new(body),
        }
    }

    /// A trial that only carries the name, for listing and filtering without a control plane.
    fn placeholder(&self) -> Trial {
        Trial::test(self.name.clone(), || Ok(()))
    }

    fn into_trial(self, cp: &'static ControlPlane) -> Trial {
        let body = self.body;
        // `{:?}` of an anyhow error prints the whole cause chain.
        Trial::test(self.name, move || {
            body(cp).map_err(|e| format!("{e:?}").into())
        })
    }
}

/// Parses the libtest command line, runs `suites` against a control plane called `cluster_name`,
/// and returns the exit code. A control plane that fails to start fails the run (never skips it).
pub fn run(cluster_name: &str, suites: &[fn() -> Vec<Case>]) -> ExitCode {
    let args = Arguments::from_args();
    let cases: Vec<Case> = suites.iter().flat_map(|suite| suite()).collect();
    let runs_any = !args.list
        && cases.iter().any(|case| {
            let trial = case.placeholder();
            !args.is_filtered_out(&trial) && !args.is_ignored(&trial)
        });
    if !runs_any {
        let placeholders = cases.iter().map(Case::placeholder).collect();
        return libtest_mimic::run(&args, placeholders).exit_code();
    }

    // Leaked so trials (which must be 'static) can borrow it; `shutdown` below still tears it down.
    let cp: &'static ControlPlane = match ControlPlane::start(cluster_name) {
        Ok(cp) => Box::leak(Box::new(cp)),
        Err(e) => {
            eprintln!("error: {e:?}");
            return ExitCode::FAILURE;
        }
    };
    let trials = cases.into_iter().map(|case| case.into_trial(cp)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    cp.shutdown();
    conclusion.exit_code()
}
