//! SR types and what their storage-manager driver allows: changed-block
//! tracking (the `VDI_CONFIG_CBT` feature, else xapi answers
//! `SR_OPERATION_NOT_SUPPORTED [sr]`) and the sizes it makes.
//!
//! | type | driver | CBT | sizes |
//! |---|---|---|---|
//! | `ext`, `nfs`, `smb` | sm `FileSR` family (VHD files) | yes | up to 2 MiB |
//! | `lvm`, `lvmoiscsi`, `lvmohba` | sm `LVHDSR` family (VHD on LVs) | yes | up to 2 MiB |
//! | `dummy` | a stand-in for a driver that keeps sizes exact (the simulator's own) | yes | exact |
//! | `nocbt` | a stand-in for any driver without `VDI_CONFIG_CBT` | no | up to 2 MiB |
//!
//! VHD sizes are rounded up to the VHD block, 2 MiB, on `VDI.create` and
//! on resizes (sm `vhdutil.validate_and_round_vhd_size`). `dummy` keeps
//! sizes that are no whole number of sectors testable.

/// What a type of SR can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SrKind {
    /// The driver has `VDI_CONFIG_CBT`.
    pub cbt: bool,
    /// Sizes are rounded up to a multiple of this (1: exact).
    pub quantum: u64,
}

/// The VHD block size, to which VHD-based SRs round sizes.
pub(crate) const VHD_BLOCK: u64 = 2 << 20;

/// The SR types the simulator knows.
pub const SR_TYPES: &[&str] = &[
    "ext",
    "nfs",
    "smb",
    "lvm",
    "lvmoiscsi",
    "lvmohba",
    "dummy",
    "nocbt",
];

/// What SR type `sr_type` can do; `None` for a type the simulator does not
/// model.
pub(crate) fn kind(sr_type: &str) -> Option<SrKind> {
    let vhd = SrKind {
        cbt: true,
        quantum: VHD_BLOCK,
    };
    match sr_type {
        "ext" | "nfs" | "smb" | "lvm" | "lvmoiscsi" | "lvmohba" => Some(vhd),
        "dummy" => Some(SrKind {
            cbt: true,
            quantum: 1,
        }),
        "nocbt" => Some(SrKind { cbt: false, ..vhd }),
        _ => None,
    }
}

/// `size` as SR type `sr_type` makes it (rounded up to its quantum),
/// saturating at the largest multiple.
pub(crate) fn round_size(sr_type: &str, size: u64) -> u64 {
    let q = kind(sr_type).map_or(1, |k| k.quantum).max(1);
    size.div_ceil(q).saturating_mul(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhd_rounds_to_2_mib_and_dummy_keeps_sizes() {
        assert_eq!(round_size("ext", 1), VHD_BLOCK);
        assert_eq!(round_size("lvm", VHD_BLOCK), VHD_BLOCK);
        assert_eq!(round_size("ext", VHD_BLOCK + 1), 2 * VHD_BLOCK);
        assert_eq!(round_size("ext", 0), 0);
        assert_eq!(round_size("dummy", 1000), 1000);
        // No overflow near the top of the range.
        assert_eq!(round_size("ext", u64::MAX), u64::MAX);
        assert!(kind("nocbt").is_some_and(|k| !k.cbt));
        assert!(kind("zfs").is_none());
    }
}
