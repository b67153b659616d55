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
