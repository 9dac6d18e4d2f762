//! The Redis engine (Redis or Valkey). Placeholder:
//! being written.

use super::{Engine, EngineConfig, Put, Record, TierError, TierResult};
use crate::ids::BlobId;

pub struct RedisEngine;

impl RedisEngine {
    pub fn open(_url: &str, _config: &EngineConfig) -> Result<RedisEngine, String> {
        Err("the Redis engine is not available yet".into())
    }
}

impl Engine for RedisEngine {
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
        "redis".into()
    }
}
