use std::path::Path;

use super::*;

const EXAMPLE: &str = include_str!("../../../config/cbtvault.example.toml");

fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(text, Path::new("/etc/cbtvault/cbtvault.toml"))
}

#[test]
fn the_shipped_example_loads() {
    let c = parse(EXAMPLE).unwrap();
    assert_eq!(c.pools.len(), 2);
    assert_eq!(c.jobs.len(), 4);
    let job = c.job("web-nightly").unwrap();
    assert!(
        matches!(&job.kind, JobKind::Xenserver { pool, consistent_vm_snapshot: true, .. } if pool == "pool-a")
    );
    assert_eq!(job.retention.unwrap().keep_daily, Some(14));
    assert!(matches!(
        c.job("kvm-1-drives").unwrap().kind,
        JobKind::Qemu { .. }
    ));
    // A copy job's s3:// target is not made relative to the file.
    assert!(matches!(
        &c.job("offsite").unwrap().kind,
        JobKind::Copy { to, disks } if to.to_str() == Some("s3://backups-offsite/site-a?region=eu-west-1") && disks.is_empty()
    ));
    let unknown = c.job("nope").unwrap_err();
    assert!(matches!(&unknown, Error::UnknownJob { name, .. } if name == "nope"));
    // A wrong job name lists the right ones.
    assert_eq!(
        unknown.to_string(),
        "no job named \"nope\" in the configuration (jobs: web-nightly, db-disks, kvm-1-drives, offsite)"
    );
    assert_eq!(c.pool("pool-b").unwrap().username, "root");
}

#[test]
fn mistakes_are_named() {
    let cases = [
        (
            EXAMPLE.replace("nbd_connections = 4", "nbd_conections = 4"),
            "nbd_conections",
        ),
        (
            EXAMPLE.replace("pool = \"pool-a\"", "pool = \"pool-x\""),
            "no pool named \"pool-x\"",
        ),
        (
            EXAMPLE.replace("password_env = \"CBTVAULT_POOL_B_PASSWORD\"", ""),
            "exactly one of password_file",
        ),
        (
            EXAMPLE.replace("at = \"02:00\"", "at = \"25:00\""),
            "not HH:MM",
        ),
        (
            EXAMPLE.replace("\"mon\", \"wed\"", "\"monday\", \"wed\""),
            "unknown day \"monday\"",
        ),
        (
            EXAMPLE.replace("6b9e2f1a-0c3d-4e5f-8a7b-9c0d1e2f3a4b", "web01"),
            "\"web01\" is not a UUID",
        ),
        (
            EXAMPLE.replace("name = \"db-disks\"", "name = \"web-nightly\""),
            "two jobs are named",
        ),
        (
            EXAMPLE.replace(
                "ca = \"/etc/cbtvault/pool-b-ca.pem\"",
                "ca = \"x\"\ninsecure = true",
            ),
            "at most one of ca",
        ),
        (
            EXAMPLE.replace("kind = \"qemu\"", "kind = \"hyperv\""),
            "hyperv",
        ),
        (
            EXAMPLE.replace("https://xcp-a.example.net", "http://xcp-a.example.net"),
            "plain HTTP, which would send the password",
        ),
        (
            EXAMPLE.replace("https://xcp-a.example.net", "ftp://xcp-a.example.net"),
            "must start with https://",
        ),
        (
            EXAMPLE.replace(
                "at = \"03:15\" }",
                "cron = \"30 1 * * mon,wed,fri\", timezone = \"Mars/Olympus\" }",
            ),
            "job \"kvm-1-drives\": schedule: unknown time zone \"Mars/Olympus\"",
        ),
        (
            EXAMPLE.replace("at = \"03:15\" }", "cron = \"61 1 * * *\" }"),
            "not a valid cron expression",
        ),
        (
            EXAMPLE.replace("at = \"03:15\" }", "at = \"03:15\", cron = \"* * * * *\" }"),
            "either at (with days) or cron",
        ),
        (
            EXAMPLE.replace("parallel = 2", "parallel = 2\nrandom_delay = \"soon\""),
            "random_delay: \"soon\" is not a duration",
        ),
        (
            EXAMPLE.replace("parallel = 2", "paralel = 2"),
            "job \"web-nightly\": unknown key \"paralel\"",
        ),
    ];
    for (text, expect) in cases {
        let err = parse(&text).unwrap_err();
        let msg = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(msg.contains(expect), "expected {expect:?} in {msg}");
    }
}

#[test]
fn relative_paths_follow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let text = r#"
        [repository]
        path = "repo"
        [[pool]]
        name = "p"
        url = "https://h"
        password_file = "pw"
    "#;
    let file = dir.path().join("c.toml");
    std::fs::write(&file, text).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.repository.path, dir.path().join("repo"));
    assert_eq!(
        c.pools[0].password_source(),
        PasswordSource::File(dir.path().join("pw"))
    );
    assert!(matches!(
        Config::load(&dir.path().join("missing.toml")),
        Err(Error::Read { .. })
    ));
}

#[test]
fn plain_http_only_when_asked_for() {
    let text = EXAMPLE.replace(
        "url = \"https://xcp-a.example.net\"",
        "url = \"http://xcp-a.example.net\"\nallow_insecure_http = true",
    );
    let c = parse(&text).unwrap();
    let pool = c.pool("pool-a").unwrap();
    assert!(pool.allow_insecure_http);
    assert!(!c.pool("pool-b").unwrap().allow_insecure_http);
}

#[test]
fn cron_schedules_with_a_time_zone() {
    let text = EXAMPLE.replace(
        "at = \"03:15\" }",
        "cron = \"30 1 * * mon,wed,fri\", timezone = \"Europe/Paris\" }\nrandom_delay = \"10m\"\ncatch_up = true",
    );
    let c = parse(&text).unwrap();
    let job = c.job("kvm-1-drives").unwrap();
    let (_, tz) = job.schedule.as_ref().unwrap().compile().unwrap();
    assert_eq!(tz.iana_name(), Some("Europe/Paris"));
    assert!(job.catch_up);
    assert_eq!(job.random_delay(), std::time::Duration::from_secs(600));
    assert_eq!(c.daemon.listen, "127.0.0.1:9460");
}

#[test]
fn a_bad_job_is_named_with_its_line() {
    let text = EXAMPLE.replace("at = \"03:15\"", "at = \"3pm\"");
    let line = EXAMPLE
        .lines()
        .position(|l| l.contains("name = \"kvm-1-drives\""))
        .unwrap()
        + 1;
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "line {line}: job \"kvm-1-drives\": schedule time \"3pm\" is not HH:MM"
        )),
        "{err}"
    );
}

#[test]
fn maintenance_tasks_have_schedules_and_unique_names() {
    let text = format!(
        "{EXAMPLE}\n[[maintenance]]\nname = \"weekly-verify\"\ntask = \"verify\"\nread_data = true\nschedule = {{ at = \"05:00\", days = [\"sun\"] }}\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.maintenance[0].task, Task::Verify);
    assert_eq!(
        c.maintenance[0].wait(),
        std::time::Duration::from_secs(3600)
    );
    let clash = text.replace("name = \"weekly-verify\"", "name = \"web-nightly\"");
    let err = parse(&clash).unwrap_err().to_string();
    assert!(
        err.contains("maintenance \"web-nightly\": the name is taken"),
        "{err}"
    );
    let gc_read = text.replace("task = \"verify\"", "task = \"gc\"");
    let err = parse(&gc_read).unwrap_err().to_string();
    assert!(
        err.contains("read_data goes with task = \"verify\""),
        "{err}"
    );
}

#[test]
fn a_vcenter_and_a_vmware_job() {
    let base = "[repository]\npath = \"/r\"\n\n[[vcenter]]\nname = \"vc\"\nurl = \"https://vc\"\n\
                username = \"u@vsphere.local\"\npassword_file = \"pw\"\npin = \"vc.pem\"\n\
                nbd_uri = \"nbd://h/{export}\"\n\n[[job]]\nname = \"j\"\nkind = \"vmware\"\n\
                vcenter = \"vc\"\nvms = [\"vm-42\"]\nfcds = [{ id = \"f1\", datastore = \"datastore-1\" }]\n";
    let c = parse(base).unwrap();
    let v = c.vcenter("vc").unwrap();
    assert_eq!(
        v.password_file.as_deref(),
        Some(Path::new("/etc/cbtvault/pw"))
    );
    assert!(matches!(&c.job("j").unwrap().kind,
        JobKind::Vmware { vms, fcds, .. } if vms == &["vm-42"] && fcds[0].datastore == "datastore-1"));
    for (text, want) in [
        (base.replace("vm-42", " "), "empty string"),
        (
            base.replace("vcenter = \"vc\"\nvms", "vcenter = \"vx\"\nvms"),
            "no vcenter named \"vx\"",
        ),
        (
            base.replace("pin = \"vc.pem\"\n", ""),
            "exactly one of ca, pin and insecure",
        ),
        (base.replace("{export}", "disk"), "names no snapshot"),
        (
            base.replace("https://vc", "http://vc"),
            "must start with https://",
        ),
        (
            base.replace("vms = [\"vm-42\"]", "vms = [\"vm-42\"]\nnodes = []"),
            "unknown key \"nodes\"",
        ),
    ] {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(want), "{want:?} not in {e}");
    }
}

#[test]
fn copy_jobs_name_another_repository_and_only_their_own_keys() {
    let base = "[repository]\npath = \"/srv/r\"\n[[job]]\nname = \"c\"\nkind = \"copy\"\n";
    let c = parse(&format!("{base}to = \"../offsite\"\n")).unwrap();
    // A relative target is relative to the configuration file.
    assert!(matches!(&c.job("c").unwrap().kind,
        JobKind::Copy { to, .. } if to == Path::new("/etc/cbtvault/../offsite")));
    let own = parse(&format!("{base}to = \"/srv/r\"\n")).unwrap_err();
    assert!(own.to_string().contains("own repository"), "{own}");
    let key = parse(&format!("{base}to = \"/x\"\npool = \"p\"\n")).unwrap_err();
    assert!(key.to_string().contains("unknown key \"pool\""), "{key}");
    let missing = parse(base).unwrap_err();
    assert!(missing.to_string().contains("to"), "{missing}");
}
