//! What the tests that run guests on this machine's /dev/kvm share.

/// Whether /dev/kvm is usable for `test`. Without it the test fails with
/// instructions, unless `BARGE_SKIP_KVM=1` asks to skip it (then `false`,
/// and the caller returns early).
///
/// # Panics
///
/// When /dev/kvm cannot be opened for reading and writing and
/// `BARGE_SKIP_KVM` is not `1`.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(_) if std::env::var("BARGE_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("{test}: skipped: /dev/kvm is not usable and BARGE_SKIP_KVM=1");
            false
        }
        Err(e) => panic!(
            "{test} needs /dev/kvm ({e}); run on a host with KVM (or nested \
             virtualization), or set BARGE_SKIP_KVM=1 to skip the KVM tests"
        ),
    }
}
