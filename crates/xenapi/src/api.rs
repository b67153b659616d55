//! Typed calls, grouped by class: `client.vdi().snapshot(…)`.
//!
//! Calls that XAPI may run for long (snapshots, CBT changes, changed-block
//! computation, destroys, creation) go through `Async.*` and task polling
//! ([`Client::call_async`]); quick reads and `VDI.get_nbd_info` (which has
//! no asynchronous form) are plain calls.

use std::collections::BTreeMap;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::types::{
    NbdInfo, SrRecord, SrRef, TaskRecord, TaskRef, VbdRecord, VbdRef, VdiCreate, VdiRecord, VdiRef,
    VmRecord, VmRef,
};
use crate::value::{Value, expect_bool, expect_string, expect_strings, expect_struct};

impl Client {
    /// VDI calls.
    pub fn vdi(&self) -> VdiApi<'_> {
        VdiApi(self)
    }

    /// VM calls.
    pub fn vm(&self) -> VmApi<'_> {
        VmApi(self)
    }

    /// VBD calls.
    pub fn vbd(&self) -> VbdApi<'_> {
        VbdApi(self)
    }

    /// SR calls.
    pub fn sr(&self) -> SrApi<'_> {
        SrApi(self)
    }

    /// Task calls.
    pub fn task(&self) -> TaskApi<'_> {
        TaskApi(self)
    }

    async fn get_record_of(&self, class: &str, r: &str) -> Result<Value> {
        self.call(&format!("{class}.get_record"), vec![Value::from(r)])
            .await
    }

    async fn ref_by_uuid(&self, class: &str, uuid: &str) -> Result<String> {
        let call = format!("{class}.get_by_uuid");
        expect_string(&call, self.call(&call, vec![Value::from(uuid)]).await?)
    }

    async fn refs_by_name(&self, class: &str, label: &str) -> Result<Vec<String>> {
        let call = format!("{class}.get_by_name_label");
        expect_strings(&call, self.call(&call, vec![Value::from(label)]).await?)
    }

    async fn all_records<R>(
        &self,
        class: &str,
        decode: fn(&Value) -> Result<R>,
    ) -> Result<Vec<(String, R)>> {
        let call = format!("{class}.get_all_records");
        let map = expect_struct(&call, self.call(&call, vec![]).await?)?;
        map.into_iter().map(|(r, v)| Ok((r, decode(&v)?))).collect()
    }

    async fn other_config_add(&self, class: &str, r: &str, key: &str, value: &str) -> Result<()> {
        self.call(
            &format!("{class}.add_to_other_config"),
            vec![Value::from(r), Value::from(key), Value::from(value)],
        )
        .await
        .map(drop)
    }

    async fn other_config_remove(&self, class: &str, r: &str, key: &str) -> Result<()> {
        self.call(
            &format!("{class}.remove_from_other_config"),
            vec![Value::from(r), Value::from(key)],
        )
        .await
        .map(drop)
    }
}

/// `VDI.*`.
pub struct VdiApi<'a>(&'a Client);

impl VdiApi<'_> {
    /// `VDI.get_record`.
    pub async fn get_record(&self, vdi: &VdiRef) -> Result<VdiRecord> {
        VdiRecord::from_value(&self.0.get_record_of("VDI", vdi.as_str()).await?)
    }

    /// `VDI.get_by_uuid`.
    pub async fn get_by_uuid(&self, uuid: &str) -> Result<VdiRef> {
        Ok(VdiRef::new(self.0.ref_by_uuid("VDI", uuid).await?))
    }

    /// `VDI.get_by_name_label`.
    pub async fn get_by_name_label(&self, label: &str) -> Result<Vec<VdiRef>> {
        Ok(self
            .0
            .refs_by_name("VDI", label)
            .await?
            .into_iter()
            .map(VdiRef::new)
            .collect())
    }

    /// `VDI.get_all_records`.
    pub async fn get_all_records(&self) -> Result<BTreeMap<VdiRef, VdiRecord>> {
        let all = self.0.all_records("VDI", VdiRecord::from_value).await?;
        Ok(all
            .into_iter()
            .map(|(r, rec)| (VdiRef::new(r), rec))
            .collect())
    }

    /// `VDI.get_uuid`.
    pub async fn get_uuid(&self, vdi: &VdiRef) -> Result<String> {
        expect_string(
            "VDI.get_uuid",
            self.0.call("VDI.get_uuid", vec![vdi.into()]).await?,
        )
    }

    /// `VDI.get_cbt_enabled`.
    pub async fn get_cbt_enabled(&self, vdi: &VdiRef) -> Result<bool> {
        let v = self.0.call("VDI.get_cbt_enabled", vec![vdi.into()]).await?;
        expect_bool("VDI.get_cbt_enabled", v)
    }

    /// `VDI.snapshot` (asynchronous). With CBT enabled, the new snapshot
    /// takes over the leaf's changed-block log.
    pub async fn snapshot(
        &self,
        vdi: &VdiRef,
        driver_params: &BTreeMap<String, String>,
    ) -> Result<VdiRef> {
        let v = self
            .0
            .call_async("VDI.snapshot", vec![vdi.into(), driver_params.into()])
            .await?;
        Ok(VdiRef::new(expect_string("VDI.snapshot", v)?))
    }

    /// `VDI.enable_cbt` (asynchronous; idempotent).
    pub async fn enable_cbt(&self, vdi: &VdiRef) -> Result<()> {
        self.0
            .call_async("VDI.enable_cbt", vec![vdi.into()])
            .await
            .map(drop)
    }

    /// `VDI.disable_cbt` (asynchronous; idempotent). Cuts the chain: the
    /// next incremental needs a new base.
    pub async fn disable_cbt(&self, vdi: &VdiRef) -> Result<()> {
        self.0
            .call_async("VDI.disable_cbt", vec![vdi.into()])
            .await
            .map(drop)
    }

    /// `VDI.list_changed_blocks` (asynchronous): the base64 MSB-first
    /// bitmap of the 64 KiB blocks written after `from` up to `to`.
    pub async fn list_changed_blocks(&self, from: &VdiRef, to: &VdiRef) -> Result<String> {
        let v = self
            .0
            .call_async("VDI.list_changed_blocks", vec![from.into(), to.into()])
            .await?;
        expect_string("VDI.list_changed_blocks", v)
    }

    /// `VDI.get_nbd_info`: where to read the VDI over NBD. Empty when the
    /// pool has no NBD-enabled network.
    pub async fn get_nbd_info(&self, vdi: &VdiRef) -> Result<Vec<NbdInfo>> {
        match self.0.call("VDI.get_nbd_info", vec![vdi.into()]).await? {
            Value::Array(items) => items.iter().map(NbdInfo::from_value).collect(),
            other => Err(Error::Decode {
                field: "result of VDI.get_nbd_info".into(),
                detail: format!("expected a set, got {}", other.kind()),
            }),
        }
    }

    /// `VDI.data_destroy` (asynchronous): drops a CBT snapshot's data and
    /// keeps its changed-block log; the VDI becomes `cbt_metadata`.
    pub async fn data_destroy(&self, vdi: &VdiRef) -> Result<()> {
        self.0
            .call_async("VDI.data_destroy", vec![vdi.into()])
            .await
            .map(drop)
    }

    /// `VDI.destroy` (asynchronous).
    pub async fn destroy(&self, vdi: &VdiRef) -> Result<()> {
        self.0
            .call_async("VDI.destroy", vec![vdi.into()])
            .await
            .map(drop)
    }

    /// `VDI.resize` (asynchronous).
    pub async fn resize(&self, vdi: &VdiRef, size: u64) -> Result<()> {
        let size =
            i64::try_from(size).map_err(|_| Error::Config(format!("size {size} too large")))?;
        self.0
            .call_async("VDI.resize", vec![vdi.into(), Value::Int(size)])
            .await
            .map(drop)
    }

    /// `VDI.create` (asynchronous), e.g. to restore into a pool; fill it
    /// with [`Client::import_raw_vdi`].
    pub async fn create(&self, args: &VdiCreate) -> Result<VdiRef> {
        let v = self
            .0
            .call_async("VDI.create", vec![args.to_value()])
            .await?;
        Ok(VdiRef::new(expect_string("VDI.create", v)?))
    }

    /// `VDI.add_to_other_config`.
    pub async fn add_to_other_config(&self, vdi: &VdiRef, key: &str, value: &str) -> Result<()> {
        self.0
            .other_config_add("VDI", vdi.as_str(), key, value)
            .await
    }

    /// `VDI.remove_from_other_config` (no error if the key is absent).
    pub async fn remove_from_other_config(&self, vdi: &VdiRef, key: &str) -> Result<()> {
        self.0.other_config_remove("VDI", vdi.as_str(), key).await
    }
}

/// `VM.*`.
pub struct VmApi<'a>(&'a Client);

impl VmApi<'_> {
    pub(crate) fn client(&self) -> &Client {
        self.0
    }

    /// `VM.get_record`.
    pub async fn get_record(&self, vm: &VmRef) -> Result<VmRecord> {
        VmRecord::from_value(&self.0.get_record_of("VM", vm.as_str()).await?)
    }

    /// `VM.get_by_uuid`.
    pub async fn get_by_uuid(&self, uuid: &str) -> Result<VmRef> {
        Ok(VmRef::new(self.0.ref_by_uuid("VM", uuid).await?))
    }

    /// `VM.get_by_name_label`.
    pub async fn get_by_name_label(&self, label: &str) -> Result<Vec<VmRef>> {
        Ok(self
            .0
            .refs_by_name("VM", label)
            .await?
            .into_iter()
            .map(VmRef::new)
            .collect())
    }

    /// `VM.get_all_records` (VMs, snapshots, templates and dom0 alike).
    pub async fn get_all_records(&self) -> Result<BTreeMap<VmRef, VmRecord>> {
        let all = self.0.all_records("VM", VmRecord::from_value).await?;
        Ok(all
            .into_iter()
            .map(|(r, rec)| (VmRef::new(r), rec))
            .collect())
    }

    /// `VM.snapshot` (asynchronous): snapshots every disk of the VM at
    /// once; returns the snapshot VM, whose VBDs lead to the VDI snapshots.
    pub async fn snapshot(&self, vm: &VmRef, new_name: &str) -> Result<VmRef> {
        let v = self
            .0
            .call_async("VM.snapshot", vec![vm.into(), Value::from(new_name)])
            .await?;
        Ok(VmRef::new(expect_string("VM.snapshot", v)?))
    }

    /// `VM.destroy` (asynchronous). On a snapshot VM this removes the VM
    /// and its VBDs but keeps the VDIs, as `data_destroy` needs.
    pub async fn destroy(&self, vm: &VmRef) -> Result<()> {
        self.0
            .call_async("VM.destroy", vec![vm.into()])
            .await
            .map(drop)
    }

    /// `VM.add_to_other_config`.
    pub async fn add_to_other_config(&self, vm: &VmRef, key: &str, value: &str) -> Result<()> {
        self.0.other_config_add("VM", vm.as_str(), key, value).await
    }

    /// `VM.remove_from_other_config`.
    pub async fn remove_from_other_config(&self, vm: &VmRef, key: &str) -> Result<()> {
        self.0.other_config_remove("VM", vm.as_str(), key).await
    }
}

/// `VBD.*`.
pub struct VbdApi<'a>(&'a Client);

impl VbdApi<'_> {
    pub(crate) fn client(&self) -> &Client {
        self.0
    }

    /// `VBD.get_record`.
    pub async fn get_record(&self, vbd: &VbdRef) -> Result<VbdRecord> {
        VbdRecord::from_value(&self.0.get_record_of("VBD", vbd.as_str()).await?)
    }

    /// `VBD.get_all_records`.
    pub async fn get_all_records(&self) -> Result<BTreeMap<VbdRef, VbdRecord>> {
        let all = self.0.all_records("VBD", VbdRecord::from_value).await?;
        Ok(all
            .into_iter()
            .map(|(r, rec)| (VbdRef::new(r), rec))
            .collect())
    }
}

/// `SR.*`.
pub struct SrApi<'a>(&'a Client);

impl SrApi<'_> {
    /// `SR.get_record`.
    pub async fn get_record(&self, sr: &SrRef) -> Result<SrRecord> {
        SrRecord::from_value(&self.0.get_record_of("SR", sr.as_str()).await?)
    }

    /// `SR.get_by_uuid`.
    pub async fn get_by_uuid(&self, uuid: &str) -> Result<SrRef> {
        Ok(SrRef::new(self.0.ref_by_uuid("SR", uuid).await?))
    }

    /// `SR.get_all_records`.
    pub async fn get_all_records(&self) -> Result<BTreeMap<SrRef, SrRecord>> {
        let all = self.0.all_records("SR", SrRecord::from_value).await?;
        Ok(all
            .into_iter()
            .map(|(r, rec)| (SrRef::new(r), rec))
            .collect())
    }
}

/// `task.*`.
pub struct TaskApi<'a>(&'a Client);

impl TaskApi<'_> {
    /// `task.get_record`.
    pub async fn get_record(&self, task: &TaskRef) -> Result<TaskRecord> {
        TaskRecord::from_value(&self.0.get_record_of("task", task.as_str()).await?)
    }

    /// `task.cancel`.
    pub async fn cancel(&self, task: &TaskRef) -> Result<()> {
        self.0
            .call("task.cancel", vec![task.into()])
            .await
            .map(drop)
    }

    /// `task.destroy`.
    pub async fn destroy(&self, task: &TaskRef) -> Result<()> {
        self.0
            .call("task.destroy", vec![task.into()])
            .await
            .map(drop)
    }
}
