//! The bytes on the wire, checked without the client's codecs.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::{DISK, PASSWORD, start};

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn xml_call(method: &str, params: &[&str]) -> String {
    let params: String = params
        .iter()
        .map(|p| format!("<param><value><string>{p}</string></value></param>"))
        .collect();
    format!(
        "<?xml version='1.0'?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    )
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(start).map(|i| i + start.len()).unwrap_or(0);
    let to = text[from..]
        .find(end)
        .map(|i| from + i)
        .unwrap_or(text.len());
    &text[from..to]
}

#[tokio::test]
async fn xmlrpc_status_struct_and_ints_as_strings() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let addr = server.addr();
    let (status, body) = post(
        addr,
        "/",
        &xml_call(
            "session.login_with_password",
            &["root", PASSWORD, "1.1", "wire"],
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<name>Status</name><value>Success</value>"),
        "{body}"
    );
    let session = between(&body, "<name>Value</name><value>", "</value>").to_owned();
    assert!(session.starts_with("OpaqueRef:"), "{session}");

    let (_, body) = post(addr, "/RPC2", &xml_call("VDI.get_all_records", &[&session])).await;
    // int is a string of decimal digits, untyped like every XAPI string.
    assert!(
        body.contains(&format!("<name>virtual_size</name><value>{DISK}</value>")),
        "{body}"
    );
    assert!(body.contains("<name>cbt_enabled</name><value><boolean>0</boolean></value>"));

    // A failure is a Status struct, never an XML-RPC fault.
    let (status, body) = post(
        addr,
        "/",
        &xml_call("VDI.get_record", &[&session, "OpaqueRef:nope"]),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!body.contains("<fault>"));
    assert!(body.contains("<name>Status</name><value>Failure</value>"));
    assert!(body.contains(
        "<name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value>\
         <value>VDI</value><value>OpaqueRef:nope</value></data></array></value>"
    ));
    let (_, body) = post(addr, "/", &xml_call("VDI.get_all", &["OpaqueRef:dead"])).await;
    assert!(
        body.contains("<value>SESSION_INVALID</value><value>OpaqueRef:dead</value>"),
        "{body}"
    );

    // Malformed: HTTP 500 with an HTML page.
    let (status, body) = post(addr, "/", "<methodCall><methodName>x</methodName>").await;
    assert_eq!(status, 500);
    assert!(body.starts_with("<html>"));
}

#[tokio::test]
async fn jsonrpc_versions_and_ints_as_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let addr = server.addr();
    let login = format!(
        r#"{{"jsonrpc":"2.0","method":"session.login_with_password","params":["root","{PASSWORD}","1.1","wire"],"id":7}}"#
    );
    let (status, body) = post(addr, "/jsonrpc", &login).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["jsonrpc"], "2.0");
    assert_eq!(v["id"], 7);
    let session = v["result"].as_str().unwrap().to_owned();

    let call = format!(r#"{{"method":"VDI.get_all_records","params":["{session}"],"id":"x"}}"#);
    let (_, body) = post(addr, "/jsonrpc", &call).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"].is_null() && v.get("jsonrpc").is_none(),
        "version 1 reply: {v}"
    );
    let rec = v["result"].as_object().unwrap().values().next().unwrap();
    assert_eq!(
        rec["virtual_size"],
        serde_json::json!(DISK),
        "a JSON number"
    );

    let call = format!(
        r#"{{"jsonrpc":"2.0","method":"VDI.get_record","params":["{session}","OpaqueRef:nope"],"id":1}}"#
    );
    let (_, body) = post(addr, "/jsonrpc", &call).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["message"], "HANDLE_INVALID");
    assert_eq!(
        v["error"]["data"],
        serde_json::json!(["VDI", "OpaqueRef:nope"])
    );
    assert!(v["error"]["code"].as_i64().unwrap() != 0);

    // No id (a notification) or no params: HTTP 500.
    let (status, _) = post(
        addr,
        "/jsonrpc",
        r#"{"jsonrpc":"2.0","method":"session.logout","params":[]}"#,
    )
    .await;
    assert_eq!(status, 500);
    let (status, _) = post(
        addr,
        "/jsonrpc",
        r#"{"jsonrpc":"2.0","method":"session.login_with_password","id":0}"#,
    )
    .await;
    assert_eq!(status, 500);
}

#[tokio::test]
async fn async_tasks_store_xmlrpc_fragments() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let addr = server.addr();
    let (_, body) = post(
        addr,
        "/",
        &xml_call("session.login_with_password", &["root", PASSWORD]),
    )
    .await;
    let session = between(&body, "<name>Value</name><value>", "</value>").to_owned();
    let (_, body) = post(addr, "/", &xml_call("VDI.get_all", &[&session])).await;
    let vdi = between(&body, "<data><value>", "</value>").to_owned();
    // A wrong parameter count is answered at once, not through a task,
    // and counted without the session (gen_server.ml).
    let (_, body) = post(addr, "/", &xml_call("Async.VDI.snapshot", &[&session])).await;
    assert!(
        body.contains("<value>MESSAGE_PARAMETER_COUNT_MISMATCH</value>")
            && body.contains("<value>Async.VDI.snapshot</value><value>2</value><value>0</value>"),
        "{body}"
    );
    // Checked before the session: a dead session still gets the count error.
    let (_, body) = post(addr, "/", &xml_call("VDI.enable_cbt", &["OpaqueRef:dead"])).await;
    assert!(
        body.contains("<value>VDI.enable_cbt</value><value>1</value><value>0</value>"),
        "{body}"
    );
    // Without driver_params (a datamodel default) the snapshot is made.
    let (_, body) = post(addr, "/", &xml_call("VDI.snapshot", &[&session, &vdi])).await;
    assert!(
        body.contains("<name>Status</name><value>Success</value>"),
        "{body}"
    );

    let call = format!(
        "<?xml version='1.0'?><methodCall><methodName>Async.VDI.snapshot</methodName><params>\
         <param><value>{session}</value></param><param><value>{vdi}</value></param>\
         <param><value><struct></struct></value></param></params></methodCall>"
    );
    let (_, body) = post(addr, "/", &call).await;
    let task = between(&body, "<name>Value</name><value>", "</value>").to_owned();
    for _ in 0..200 {
        let (_, body) = post(addr, "/", &xml_call("task.get_status", &[&session, &task])).await;
        if between(&body, "<name>Value</name><value>", "</value>") != "pending" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (_, body) = post(addr, "/", &xml_call("task.get_result", &[&session, &task])).await;
    // The result is an XML-RPC fragment, escaped inside the string value.
    assert!(body.contains("&lt;value&gt;OpaqueRef:"), "{body}");
}
