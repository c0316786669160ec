//! The `file` and `cached_file` engines (being built).

use super::{Applied, Store, StoreError, WriteCtx};
use crate::session::{Patch, Record, SessionKey};

pub struct FileStore {}

impl FileStore {
    pub async fn open(path: &std::path::Path, cached: bool) -> Result<FileStore, StoreError> {
        let _ = (path, cached);
        Err(StoreError::Open(
            "this engine is not available in this build yet".into(),
        ))
    }
}

impl Store for FileStore {
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
