//! What the runner asks a XenServer pool before it backs up.

use cbtvault_xenapi::Client;

/// The uuids of a VM's disks (not CD drives, not empty drives).
pub(crate) async fn vm_disks(
    client: &Client,
    vm_uuid: &str,
) -> Result<Vec<String>, cbtvault_xenapi::Error> {
    let vm = client.vm().get_by_uuid(vm_uuid).await?;
    let record = client.vm().get_record(&vm).await?;
    let mut out = Vec::new();
    for vbd in &record.vbds {
        let v = client.vbd().get_record(vbd).await?;
        if v.vbd_type.eq_ignore_ascii_case("disk") && !v.empty && !v.vdi.is_null() {
            out.push(client.vdi().get_uuid(&v.vdi).await?);
        }
    }
    Ok(out)
}
