use super::*;

const UID: &str = "6f1c2b7e-3d4a-4b8c-9e0f-1a2b3c4d5e6f";

#[test]
fn pod_cgroups_are_recognized_in_every_driver_and_qos_layout() {
    let systemd = UID.replace('-', "_");
    for name in [
        format!("pod{UID}"),
        format!("kubepods-pod{systemd}.slice"),
        format!("kubepods-burstable-pod{systemd}.slice"),
        format!("kubepods-besteffort-pod{systemd}.slice"),
        format!("pod{}", UID.to_ascii_uppercase()),
    ] {
        assert_eq!(pod_uid_of_dir(&name).as_deref(), Some(UID), "{name}");
    }
    for name in [
        "kubepods",
        "kubepods.slice",
        "kubepods-burstable.slice",
        "besteffort",
        "cri-containerd-0123abcd.scope",
        "pod",
        "podnot-a-uid",
        "kubepods-pod.slice",
        // A container named like a pod is not a pod-level cgroup unless it parses as a UID.
        "pod6f1c2b7e-3d4a-4b8c-9e0f-1a2b3c4d5e6",
        "pod6f1c2b7e_3d4a_4b8c_9e0f_1a2b3c4d5e6f",
    ] {
        assert_eq!(pod_uid_of_dir(name), None, "{name}");
    }
}

#[test]
fn the_pod_level_part_of_a_process_cgroup_is_its_nearest_pod_ancestor() {
    let systemd = UID.replace('-', "_");
    let cases = [
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd}.slice/\
                 cri-containerd-0a1b.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd}.slice"
            ),
        ),
        (
            format!("/kubepods/pod{UID}/0a1b2c"),
            format!("/kubepods/pod{UID}"),
        ),
        (
            format!("/custom/root/kubepods/besteffort/pod{UID}/0a1b2c"),
            format!("/custom/root/kubepods/besteffort/pod{UID}"),
        ),
    ];
    for (rel, want) in cases {
        assert_eq!(pod_prefix(&rel), Some((want, UID.to_string())), "{rel}");
    }
    assert_eq!(pod_prefix("/system.slice/containerd.service"), None);
    assert_eq!(pod_prefix("/"), None);
}

#[test]
fn uids_are_checked_and_made_canonical() {
    assert_eq!(canonical_uid(&UID.to_ascii_uppercase()).expect("uid"), UID);
    for bad in [
        "",
        "x",
        "6f1c2b7e3d4a4b8c9e0f1a2b3c4d5e6f",
        "../../etc",
        &UID[1..],
    ] {
        let e = canonical_uid(bad).expect_err(bad);
        assert_eq!(e.kind(), "bad_uid");
    }
    // The search refuses a bad UID before it reads anything.
    let e = find_pod_cgroup(Path::new("/nonexistent"), "../x").expect_err("bad uid");
    assert_eq!(e.kind(), "bad_uid");
}
