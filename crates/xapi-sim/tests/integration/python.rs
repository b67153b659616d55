//! The official Python SDK (PyPI package `XenAPI`, XML-RPC) against the
//! simulator, unchanged. The package is installed into a virtualenv under
//! a temporary directory; if that fails (no python3, no PyPI), the test
//! fails and says why: it must not pass without having run.

use std::path::Path;
use std::process::Command;

use super::common::{DISK, PASSWORD, start};

const SCRIPT: &str = r#"
import base64, sys, time
import XenAPI

url, password, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
session = XenAPI.Session(url)
session.xenapi.login_with_password("root", password, "1.1", "python-sdk-test")
x = session.xenapi
try:
    vdis = x.VDI.get_all_records()
    leaf, rec = next((r, v) for r, v in vdis.items()
                     if v["name_label"] == "vm-0 disk 0" and not v["is_a_snapshot"])
    assert int(rec["virtual_size"]) == size, rec["virtual_size"]
    assert rec["type"] == "user"
    assert x.VDI.get_by_uuid(rec["uuid"]) == leaf

    x.VDI.enable_cbt(leaf)
    assert x.VDI.get_cbt_enabled(leaf) is True
    s1 = x.VDI.snapshot(leaf, {})
    x.sim.write_blocks(leaf, [3, 17], 5)
    s2 = x.VDI.snapshot(leaf, {})
    assert x.VDI.get_snapshot_of(s2) == leaf

    bitmap = base64.b64decode(x.VDI.list_changed_blocks(s1, s2))
    assert len(bitmap) == (size // 65536 + 7) // 8, len(bitmap)
    changed = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))]
    assert changed == [3, 17], changed

    # The same through Async.* and a task; its result is an XML-RPC fragment.
    task = x.Async.VDI.list_changed_blocks(s1, s2)
    while x.task.get_status(task) == "pending":
        time.sleep(0.01)
    assert x.task.get_status(task) == "success"
    result = x.task.get_result(task)
    assert result.startswith("<value>") and result.endswith("</value>"), result
    x.task.destroy(task)

    x.VDI.data_destroy(s1)
    assert x.VDI.get_type(s1) == "cbt_metadata"
    x.VDI.data_destroy(s1)  # idempotent

    try:
        x.VDI.snapshot(s1, {})
        raise AssertionError("snapshot of a cbt_metadata VDI succeeded")
    except XenAPI.Failure as f:
        assert f.details == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"], f.details

    try:
        x.VDI.list_changed_blocks(s2, s1)
        raise AssertionError("reversed list_changed_blocks succeeded")
    except XenAPI.Failure as f:
        assert f.details[0] == "SR_BACKEND_FAILURE_460" and len(f.details) == 4, f.details

    # A guest made as a whole-VM restore makes it (XML-RPC ints as text).
    vm = x.VM.create({"name_label": "restored", "memory_static_max": "2147483648",
                      "memory_dynamic_max": "2147483648", "memory_dynamic_min": "1073741824",
                      "memory_static_min": "536870912", "VCPUs_max": "2",
                      "VCPUs_at_startup": "2", "platform": {"acpi": "1"}})
    assert x.VM.get_power_state(vm) == "Halted"
    assert x.VM.get_memory_static_max(vm) == "2147483648"
    net = x.network.get_all()[0]
    vif = x.VIF.create({"VM": vm, "network": net, "device": "0", "MAC": "",
                        "MTU": "1500", "other_config": {}, "qos_algorithm_type": "",
                        "qos_algorithm_params": {}})
    assert len(x.VIF.get_MAC(vif)) == 17
    try:
        x.VIF.create({"VM": vm, "network": net, "device": "1", "MAC": "nope"})
        raise AssertionError("a bad MAC was taken")
    except XenAPI.Failure as f:
        assert f.details == ["MAC_INVALID", "nope"], f.details
    x.VM.start(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    try:
        x.VM.destroy(vm)
        raise AssertionError("a running VM was destroyed")
    except XenAPI.Failure as f:
        assert f.details == ["VM_BAD_POWER_STATE", vm, "halted", "running"], f.details
    x.VM.hard_shutdown(vm)
    x.VIF.destroy(vif)
    x.VM.destroy(vm)
    try:
        x.VM.get_record(vm)
        raise AssertionError("a destroyed VM has a record")
    except XenAPI.Failure as f:
        assert f.details == ["HANDLE_INVALID", "VM", vm], f.details

    # The SDK logs in again by itself after SESSION_INVALID.
    x.sim.expire_sessions()
    assert len(x.VDI.get_all()) == len(vdis) + 2
    print("python-sdk-ok")
finally:
    session.xenapi.session.logout()
"#;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn install_sdk(venv: &Path) -> std::path::PathBuf {
    run(
        Command::new("python3").args(["-m", "venv"]).arg(venv),
        "creating a Python virtualenv (is python3 with venv installed?)",
    );
    let python = venv.join("bin").join("python");
    run(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "XenAPI",
        ]),
        "pip install XenAPI from PyPI (this test needs PyPI; it does not skip)",
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    let python = tokio::task::spawn_blocking(move || install_sdk(&venv))
        .await
        .unwrap();
    let state = dir.path().join("state");
    let server = start(&state).await;
    let script = dir.path().join("sdk_test.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let url = server.http_url();
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(&python)
                .arg(&script)
                .arg(&url)
                .arg(PASSWORD)
                .arg(DISK.to_string()),
            "the Python SDK script",
        )
    })
    .await
    .unwrap();
    assert!(out.contains("python-sdk-ok"), "{out}");
    assert_eq!(server.sim().session_count(), 0, "the script logged out");
}
