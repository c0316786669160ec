//! The `redis` and `cached_redis` engines (being built).

use super::{Applied, Store, StoreError, WriteCtx};
use crate::session::{Patch, Record, SessionKey};

pub struct RedisStore {}

impl RedisStore {
    pub async fn open(
        url: &str,
        timeout: std::time::Duration,
        cached: bool,
    ) -> Result<RedisStore, StoreError> {
        let _ = (url, timeout, cached);
        Err(StoreError::Open(
            "this engine is not available in this build yet".into(),
        ))
    }
}

impl Store for RedisStore {
    async fn load(&self, _key: &SessionKey, _now: i64) -> Result<Option<Record>, StoreError> {
        unreachable!("cannot be opened")
    }
    async fn create(&self, _record: Record) -> Result<SessionKey, StoreError> {
        unreachable!("cannot be opened")
    }
    async fn apply(
        &self,
        _key: &SessionKey,
        _patch: &Patch,
        _ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        unreachable!("cannot be opened")
    }
    async fn delete(&self, _key: &SessionKey) -> Result<(), StoreError> {
        unreachable!("cannot be opened")
    }
    async fn clear_expired(&self, _now: i64) -> Result<u64, StoreError> {
        unreachable!("cannot be opened")
    }
}
