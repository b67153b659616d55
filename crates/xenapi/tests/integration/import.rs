//! VDI.create + PUT /import_raw_vdi: a restore into a pool.

use std::io::Cursor;

use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_xenapi::{Error, VdiCreate};

use super::common::{BOTH, client, disk_of, start};

#[tokio::test]
async fn import_raw_vdi_writes_the_data() {
    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let (disk, uuid) = disk_of(&c, "vm-0").await;
        // An SR that keeps sizes exact (VHD SRs round them up to 2 MiB).
        env.sim.sim().set_sr_type_of(&uuid, "dummy").unwrap();
        let sr = c.vdi().get_record(&disk).await.unwrap().sr;
        let size = 40 * BLOCK_SIZE + 512;
        let mut args = VdiCreate::new("restored", sr, size);
        args.other_config
            .insert("cbtvault".into(), "restore".into());
        let vdi = c.vdi().create(&args).await.unwrap();
        let rec = c.vdi().get_record(&vdi).await.unwrap();
        assert_eq!(rec.virtual_size, size);
        assert_eq!(rec.other_config["cbtvault"], "restore");
        assert_eq!(rec.name_label, "restored");

        // Data with zero stretches, not a multiple of the chunk size.
        let mut data = vec![0u8; size as usize];
        for (i, b) in data.iter_mut().enumerate() {
            if (i / BLOCK_SIZE as usize).is_multiple_of(3) {
                *b = (i % 251) as u8 + 1;
            }
        }
        c.import_raw_vdi(&vdi, Cursor::new(data.clone()), size)
            .await
            .unwrap();
        let back = env.sim.sim().read(&rec.uuid, 0, size as usize).unwrap();
        assert!(back == data, "imported data differs ({t:?})");

        // More data than the VDI holds is refused.
        let err = c
            .import_raw_vdi(
                &vdi,
                Cursor::new(vec![1u8; size as usize + 4096]),
                size + 4096,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::HttpStatus { status: 400, .. }),
            "{err}"
        );
        c.vdi().destroy(&vdi).await.unwrap();
    }
}

#[tokio::test]
async fn import_renews_an_expired_session_first() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let (disk, _) = disk_of(&c, "vm-1").await;
    let sr = c.vdi().get_record(&disk).await.unwrap().sr;
    let vdi = c
        .vdi()
        .create(&VdiCreate::new("r", sr, BLOCK_SIZE))
        .await
        .unwrap();
    env.sim.sim().expire_sessions();
    c.import_raw_vdi(&vdi, Cursor::new(vec![7u8; 1000]), 1000)
        .await
        .unwrap();
    let uuid = c.vdi().get_uuid(&vdi).await.unwrap();
    assert_eq!(
        env.sim.sim().read(&uuid, 0, 1001).unwrap()[..1000],
        [7u8; 1000]
    );
}

/// A sparse VHD imported onto an existing VDI writes only its blocks; a
/// malformed one is refused before anything is written.
#[tokio::test]
async fn import_vhd_writes_only_the_blocks_it_carries() {
    use cbtvault_xenapi::vhd::SparseVhd;
    use std::collections::BTreeSet;

    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let (disk, uuid) = disk_of(&c, "vm-0").await;
        env.sim.sim().set_sr_type_of(&uuid, "dummy").unwrap();
        let sr = c.vdi().get_record(&disk).await.unwrap().sr;
        // Two VHD blocks and a 512-byte tail block at the disk's end.
        let size = 64 * BLOCK_SIZE + 512;
        let vdi = c
            .vdi()
            .create(&VdiCreate::new("target", sr, size))
            .await
            .unwrap();
        let vuuid = c.vdi().get_uuid(&vdi).await.unwrap();
        let old = vec![5u8; size as usize];
        c.import_raw_vdi(&vdi, Cursor::new(old.clone()), size)
            .await
            .unwrap();

        let grains = BTreeSet::from([1u64, 40, 64]);
        let vhd = SparseVhd::new(size, grains.clone()).unwrap();
        let mut body = Vec::new();
        vhd.write_to(&mut body, |g, buf| {
            buf.fill(g as u8 + 100);
            Ok(())
        })
        .unwrap();
        let mut want = old.clone();
        for g in &grains {
            let start = (g * BLOCK_SIZE) as usize;
            let end = (start + BLOCK_SIZE as usize).min(size as usize);
            want[start..end].fill(*g as u8 + 100);
        }
        c.import_vhd(&vdi, Cursor::new(body.clone()), vhd.len())
            .await
            .unwrap();
        let back = env.sim.sim().read(&vuuid, 0, size as usize).unwrap();
        assert!(back == want, "VHD import differs ({t:?})");
        let (received, sectors) = env.sim.sim().last_import();
        assert_eq!(received, vhd.len());
        assert_eq!(sectors, (2 * BLOCK_SIZE + 512) / 512);

        // A corrupted footer checksum: refused, nothing written.
        let mut bad = body.clone();
        bad[64] ^= 0xff;
        let err = c
            .import_vhd(&vdi, Cursor::new(bad), vhd.len())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::HttpStatus { status: 500, body, .. } if body.contains("checksum")),
            "{err}"
        );
        // A VHD of another size: refused.
        let other = SparseVhd::new(size - 512, BTreeSet::from([0])).unwrap();
        let mut small = Vec::new();
        other
            .write_to(&mut small, |_, b| {
                b.fill(1);
                Ok(())
            })
            .unwrap();
        let err = c
            .import_vhd(&vdi, Cursor::new(small), other.len())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::HttpStatus { status: 500, body, .. } if body.contains("VDI")),
            "{err}"
        );
        let back = env.sim.sim().read(&vuuid, 0, size as usize).unwrap();
        assert!(back == want, "a refused VHD changed the VDI ({t:?})");
        c.vdi().destroy(&vdi).await.unwrap();
    }
}
