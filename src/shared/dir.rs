//! The shared-directory engine (NFS, CephFS, any POSIX path). Placeholder:
//! being written.

use std::path::Path;

use super::{Engine, EngineConfig, Put, Record, TierError, TierResult};
use crate::ids::BlobId;

pub struct DirEngine;

impl DirEngine {
    pub fn open(_root: &Path, _config: &EngineConfig) -> Result<DirEngine, String> {
        Err("the shared-directory engine is not available yet".into())
    }
}

impl Engine for DirEngine {
    fn get_record(&self, _path: &[u8]) -> TierResult<Option<Record>> {
        Err(TierError::Unavailable("not implemented".into()))
    }
    fn put_record(&self, _path: &[u8], _record: &Record, _create_only: bool) -> TierResult<Put> {
        Err(TierError::Unavailable("not implemented".into()))
    }
    fn has_blob(&self, _id: &BlobId) -> TierResult<bool> {
        Err(TierError::Unavailable("not implemented".into()))
    }
    fn get_blob(&self, _id: &BlobId, _max_bytes: u64) -> TierResult<Option<Vec<u8>>> {
        Err(TierError::Unavailable("not implemented".into()))
    }
    fn put_blob(&self, _id: &BlobId, _bytes: &[u8]) -> TierResult<()> {
        Err(TierError::Unavailable("not implemented".into()))
    }
    fn describe(&self) -> String {
        "dir".into()
    }
}
