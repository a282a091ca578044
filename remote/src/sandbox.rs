//! [`RemoteSandbox`]: a sandbox of a [`RemoteStore`], running from its cache under its lease.

use std::sync::Arc;
use std::time::Duration;

use dormant_core::snapshot::SnapshotId;
use dormant_core::{
    Command, DirEntry, Egress, ExecOutput, Execution, Grants, Interrupt, Metrics, Ports, Processes,
    Result, Sandbox, State, StreamingExec, Terminals, Tier,
};

use crate::{Lease, RemoteStore};

/// A sandbox whose snapshots go to a [`RemoteStore`]: every call goes to the sandbox inside
/// (running from the store's cache), and
/// - [`checkpoint`](Sandbox::checkpoint) and [`standby`](Sandbox::standby) first check the
///   lease (refused with [`Error::LeaseLost`](dormant_core::Error::LeaseLost) once another
///   host took the sandbox over), commit locally, then queue the upload
///   ([`RemoteStore::upload`]); standby releases the lease once uploaded;
///   [`wait_durable`](Self::wait_durable) waits for an upload;
/// - [`resume_with`](Sandbox::resume_with) takes the lease again if it was released, and
///   fetches the snapshot if the cache lacks it;
/// - [`fork`](Sandbox::fork)'s children are new sandboxes, each with a lease of its own;
/// - [`kill`](Sandbox::kill) records the kill in the head ([`RemoteStore::kill`]: a resume by
///   id then finds nothing) and releases the lease; dropping the sandbox releases it too, on
///   the upload thread after its queued uploads (a later acquisition in this process waits
///   for them).
#[derive(Debug)]
pub struct RemoteSandbox {
    inner: Box<dyn Sandbox>,
    store: RemoteStore,
    lease: Arc<Lease>,
}

impl RemoteSandbox {
    /// Wraps `inner`, a sandbox running from `store`'s cache whose lease is `lease`.
    pub fn new(inner: Box<dyn Sandbox>, store: RemoteStore, lease: Arc<Lease>) -> RemoteSandbox {
        RemoteSandbox {
            inner,
            store,
            lease,
        }
    }

    /// Its lease.
    pub fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }

    /// Its store.
    pub fn store(&self) -> &RemoteStore {
        &self.store
    }

    /// Waits until snapshot `id` (a checkpoint or standby of this sandbox) is in the bucket
    /// and the sandbox's head names it: [`RemoteStore::wait_durable`].
    pub fn wait_durable(&self, id: &SnapshotId) -> Result<()> {
        self.store.wait_durable(&self.lease, id)
    }
}

impl Drop for RemoteSandbox {
    fn drop(&mut self) {
        self.store.release_later(&self.lease);
    }
}

impl Sandbox for RemoteSandbox {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn tier(&self) -> Tier {
        self.inner.tier()
    }
    fn state(&self) -> State {
        self.inner.state()
    }
    fn run_code(&mut self, code: &str) -> Result<Execution> {
        self.inner.run_code(code)
    }
    fn run_code_with_timeout(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        self.inner.run_code_with_timeout(code, timeout)
    }
    fn exec(&mut self, cmd: &Command) -> Result<ExecOutput> {
        self.inner.exec(cmd)
    }
    fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        self.inner.read_file(path)
    }
    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        self.inner.write_file(path, data)
    }
    fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>> {
        self.inner.list_dir(path)
    }
    fn remove(&mut self, path: &str) -> Result<()> {
        self.inner.remove(path)
    }
    fn exists(&mut self, path: &str) -> Result<bool> {
        self.inner.exists(path)
    }
    fn checkpoint(&mut self) -> Result<SnapshotId> {
        self.store.check(&self.lease)?;
        let id = self.inner.checkpoint()?;
        self.store.upload(&self.lease, &id, false);
        Ok(id)
    }
    fn standby(&mut self) -> Result<SnapshotId> {
        if self.inner.state() != State::Standby {
            self.store.check(&self.lease)?;
        }
        let id = self.inner.standby()?;
        self.store.upload(&self.lease, &id, true);
        Ok(id)
    }
    fn grants(&self) -> &Grants {
        self.inner.grants()
    }
    fn resume_with(&mut self, id: &SnapshotId, grants: &Grants) -> Result<()> {
        self.store.reacquire(&self.lease)?;
        if !self.store.cache().contains(id) {
            self.store.pull(id)?;
        }
        self.inner.resume_with(id, grants)
    }
    fn fork(&mut self, n: usize) -> Result<Vec<Self>> {
        self.store.check(&self.lease)?;
        let children = self.inner.fork_boxed(n)?;
        let mut out = Vec::with_capacity(children.len());
        for mut c in children {
            match self.store.acquire(c.id(), true, false) {
                Ok(lease) => out.push(RemoteSandbox::new(c, self.store.clone(), lease)),
                Err(e) => {
                    let _ = c.kill();
                    return Err(e);
                }
            }
        }
        Ok(out)
    }
    fn fork_boxed(&mut self, n: usize) -> Result<Vec<Box<dyn Sandbox>>> {
        Ok(dormant_core::sandbox::boxed(self.fork(n)?))
    }
    fn kill(&mut self) -> Result<()> {
        let r = self.inner.kill();
        self.store.kill(&self.lease)?;
        r
    }
    fn metrics(&mut self) -> Result<Metrics> {
        self.inner.metrics()
    }
    fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        self.inner.interrupter()
    }
    fn processes(&mut self) -> Result<&mut dyn Processes> {
        self.inner.processes()
    }
    fn ports(&mut self) -> Result<&mut dyn Ports> {
        self.inner.ports()
    }
    fn egress(&mut self) -> Result<&mut dyn Egress> {
        self.inner.egress()
    }
    fn terminals(&mut self) -> Result<&mut dyn Terminals> {
        self.inner.terminals()
    }
    fn streaming(&mut self) -> Option<&mut dyn StreamingExec> {
        self.inner.streaming()
    }
}
