//! Progress events the engine emits; the command line draws them.

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
    /// The operation ended (successfully or not).
    fn finish(&self) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {}
