//! Changed-block tracking: [`DirtyBitmap`] (what changed since a snapshot, at
//! a fixed granularity), the trust decision ([`decide`]: may this bitmap
//! drive an incremental against the disk's previous snapshot?), the optional
//! [`spot_check`], and [`prepare_vm`], which turns a VM's disks into backup
//! inputs under one [`CbtPolicy`].
//!
//! The backup pipeline knows nothing of bitmaps: it takes the
//! [`ChangedBlocks`](crate::ChangedBlocks) a decision produced as its input.
//! Each snapshot records in its disk properties the bitmap it consumed
//! ([`PROP_BITMAP`](crate::format::PROP_BITMAP)), the bitmap that tracks
//! changes since it ([`PROP_NEXT_BITMAP`](crate::format::PROP_NEXT_BITMAP))
//! and, when CBT was asked for but not trusted, why
//! ([`PROP_FALLBACK`](crate::format::PROP_FALLBACK)).

mod bitmap;
mod spot_check;
mod trust;
mod vm;

pub use bitmap::DirtyBitmap;
pub use spot_check::spot_check;
pub use trust::{
    decide, prepare_disk, CbtDecision, CbtDisk, CbtParent, CbtPolicy, CbtRequest, PreparedDisk,
};
pub use vm::{prepare_vm, FindParent, PreparedVm};
