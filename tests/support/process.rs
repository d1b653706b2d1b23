//! Child processes of the test harness (etcd, kube-apiserver, kube-controller-manager).
//!
//! Each child gets `PR_SET_DEATHSIG`, so a crashed or killed test binary never leaves a control plane
//! behind. The kernel sends that signal when the *thread* that forked the child exits, not the
//! process, so all children are forked by one [`Spawner`] thread that lives as long as its owner:
//! test worker threads come and go, and a restart from one of them must not tie the new child to it.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, getppid};

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// A thread whose only job is to fork children, so their death signal is tied to its lifetime.
pub struct Spawner {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    pub fn new() -> Result<Spawner> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut command, reply) in queue {
                    let _ = reply.send(command.spawn());
                }
            })
            .context("starting the spawner thread")?;
        Ok(Spawner {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Spawns `command` from the spawner thread; the child is SIGKILLed if that thread ends.
    pub fn spawn(&self, mut command: Command) -> io::Result<Child> {
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes two syscalls (no allocation
        // on the success path, and the error path converts an errno without allocating).
        unsafe {
            command.pre_exec(move || {
                prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died before prctl took effect; then nobody would signal us.
                if getppid().as_raw() as u32 != parent {
                    return Err(Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let (reply, answer) = mpsc::channel();
        let jobs = self.jobs.as_ref().expect("spawner used after drop");
        jobs.send((command, reply))
            .map_err(|_| io::Error::other("spawner thread is gone"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("spawner thread is gone"))?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running component with its log file; stopped (TERM, then KILL) when dropped.
pub struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Component {
    /// Starts `program args…` with stdout and stderr appended to `log` (appended, so a restarted
    /// component keeps its earlier history in the same file).
    pub fn start(
        spawner: &Spawner,
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Component> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawner
            .spawn(command)
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Component { name, child, log })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The process id, for reading its `/proc` entries.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the log, headed by the component's name, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(unreadable: {e})"));
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!(
            "---- last {lines} lines of {} ({}) ----\n{tail}",
            self.name,
            self.log.display()
        )
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        self.stop_with_status();
    }

    /// [`Self::stop`], returning how the process ended (`None` if it had to be killed).
    pub fn stop_with_status(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} ignored SIGTERM for 10 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop();
    }
}
