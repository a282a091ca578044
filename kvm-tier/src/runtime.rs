//! [`KvmRuntime`]: the KVM tier behind dormant's tier-independent [`Runtime`], and
//! [`KvmSandbox`]'s capabilities (background processes, streaming exec) as the contract's
//! traits.
//!
//! Everything here is a thin seam over [`KvmSandbox`]'s own calls: the runtime holds the
//! [`KvmOptions`] its sandboxes get, and boxes what they give.

use std::sync::Arc;
use std::time::Duration;

use dormant_core::progress::Progress;
use dormant_core::{
    Command, Grants, LocalStore, Processes, Result, Runtime, Sandbox, SandboxSpec, SnapshotId,
    StreamingExec, Tier,
};

use crate::sandbox::{KvmOptions, KvmSandbox};

/// Creates, resumes and forks Linux microVMs ([`KvmSandbox`]) with its [`KvmOptions`]; the
/// KVM tier's [`Runtime`]. Cheap to clone; holds no VM.
#[derive(Debug, Clone, Default)]
pub struct KvmRuntime {
    opts: KvmOptions,
}

impl KvmRuntime {
    /// A runtime whose sandboxes get `opts`.
    pub fn new(opts: KvmOptions) -> KvmRuntime {
        KvmRuntime { opts }
    }

    /// The options its sandboxes get.
    pub fn options(&self) -> &KvmOptions {
        &self.opts
    }
}

impl Runtime for KvmRuntime {
    fn tier(&self) -> Tier {
        Tier::Kvm
    }

    /// The key of the base snapshot a sandbox of `spec` resumes (guest image contents, RAM,
    /// disk and boot parameters).
    fn fingerprint(&self, spec: &SandboxSpec) -> Result<String> {
        KvmSandbox::base_key(
            &crate::sandbox::GuestImage::for_image(spec.image.as_deref())?,
            spec,
            &self.opts,
        )
    }

    fn create(&self, store: Arc<LocalStore>, spec: SandboxSpec) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(KvmSandbox::create_with(
            store,
            spec,
            self.opts.clone(),
        )?))
    }

    /// Reports a base's first boot in [`Unit::Steps`]: see
    /// [`KvmSandbox::create_with_progress`].
    fn create_with_progress(
        &self,
        store: Arc<LocalStore>,
        spec: SandboxSpec,
        progress: &dyn Progress,
    ) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(KvmSandbox::create_with_progress(
            store,
            spec,
            self.opts.clone(),
            progress,
        )?))
    }

    fn resume(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
    ) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(KvmSandbox::from_snapshot_granted(
            store,
            id,
            grants,
            self.opts.clone(),
        )?))
    }

    fn fork(
        &self,
        store: Arc<LocalStore>,
        id: &SnapshotId,
        grants: &Grants,
        n: usize,
    ) -> Result<Vec<Box<dyn Sandbox>>> {
        KvmSandbox::children(&store, id, grants, &self.opts, n).map(dormant_core::sandbox::boxed)
    }
}

impl Processes for KvmSandbox {
    fn spawn(&mut self, cmd: &Command) -> Result<u32> {
        KvmSandbox::spawn(self, cmd)
    }

    fn wait(&mut self, pid: u32, timeout: Option<Duration>) -> Result<Option<i32>> {
        KvmSandbox::wait(self, pid, timeout)
    }

    fn output(&mut self, pid: u32) -> Result<(Vec<u8>, Vec<u8>, bool)> {
        KvmSandbox::output(self, pid)
    }

    fn signal(&mut self, pid: u32, signal: i32) -> Result<()> {
        KvmSandbox::signal(self, pid, signal)
    }

    fn listening(&mut self, port: u16) -> Result<bool> {
        KvmSandbox::listening(self, port)
    }
}

impl StreamingExec for KvmSandbox {
    fn exec_streaming(
        &mut self,
        cmd: &Command,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<i32> {
        KvmSandbox::exec_streaming(self, cmd, on_stdout, on_stderr)
    }
}
