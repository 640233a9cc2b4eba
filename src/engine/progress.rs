//! Progress events the engine emits; the command line draws them.
//!
//! Every method has a no-op default, so a sink implements only what it
//! shows. The calls come once per chunk or frame (megabytes), never per
//! block, so a sink may take a lock.

/// What an operation is doing now. The order is the order an operation
/// goes through them (a phase may be skipped, never revisited): sync
/// compares, then sends; convert writes (a push sends while the peer
/// writes); both end by verifying the result when there is something to
/// wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Reading and hashing blocks to find those that differ (sync), or
    /// comparing two images.
    Compare,
    /// Sending data to the peer (push, sync).
    Send,
    /// Writing the output here (convert, pull).
    Write,
    /// Waiting for the end's verdict: the receiver's digest check and
    /// fsync (push, sync), the stream's digest (pull).
    Verify,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Compare => "compare",
            Phase::Send => "send",
            Phase::Write => "write",
            Phase::Verify => "verify",
        }
    }
}

/// Receives progress from the pipeline's writer stage.
pub trait Progress: Sync {
    /// The total bytes of data the operation will go through.
    fn start(&self, _total: u64) {}
    /// `bytes` more of the total are done.
    fn advance(&self, _bytes: u64) {}
    /// `bytes` more of data were sent (sync: the blocks that differ).
    fn sent(&self, _bytes: u64) {}
    /// The total grows by `bytes` (sync: each block found to differ adds
    /// its sending to the job, so the bar and its ETA cover comparing and
    /// sending).
    fn grow(&self, _bytes: u64) {}
    /// The operation entered `phase`.
    fn phase(&self, _phase: Phase) {}
    /// `bytes` more crossed the connection to the peer (frames as written
    /// or read: compressed, with their headers).
    fn wire(&self, _bytes: u64) {}
    /// The operation ended (successfully or not).
    fn finish(&self) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {}
