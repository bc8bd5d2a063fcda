//! The jobs in the shape the engine's integration tests were written for
//! (free functions with a progress sink); each calls the `Repository`
//! method of the same name.

use std::path::Path;

use cairn_engine::{
    BackupDisk, BackupOptions, NoProgress, Repository, RestoreOptions, VerifyOptions,
};

pub fn backup(
    repo: &Repository,
    disks: Vec<BackupDisk>,
    opts: &BackupOptions,
    _progress: &NoProgress,
) -> cairn_engine::Result<cairn_engine::BackupStats> {
    repo.backup(disks, opts)
}

pub fn restore_to_dir(
    repo: &Repository,
    id: &cairn_engine::SnapshotId,
    dir: &Path,
    opts: &RestoreOptions,
    _progress: &NoProgress,
) -> cairn_engine::Result<cairn_engine::RestoreStats> {
    repo.restore_to_dir(id, dir, opts)
}

pub fn verify(
    repo: &Repository,
    opts: &VerifyOptions,
    _progress: &NoProgress,
) -> cairn_engine::Result<cairn_engine::VerifyReport> {
    repo.verify(opts)
}
