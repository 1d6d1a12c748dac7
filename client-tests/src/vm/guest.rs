//! What runs inside the guest: the init script, and the kernel command line that passes it the
//! run's parameters (the kernel hands unknown `KEY=value` words to init as environment).

/// The address the guest uses for the host's loopback (qemu user-mode networking).
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// Lines the guest prints for the host's progress display start with one of these.
pub const PROGRESS_PREFIXES: &[&str] = &["nbdfault: ", "nbdfault-init: "];

/// The run's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestParams {
    pub nbd_port: u16,
    pub control_port: u16,
    /// Comma-separated: `xfs,ext4`. Each is tested on its own device, attached to the export
    /// of the same name.
    pub filesystems: String,
    /// Comma-separated scenario names, or empty for all.
    pub only: String,
    pub delay_ms: u64,
    pub package: String,
}

/// The kernel command line: serial console, no reboot on panic, and the parameters.
pub fn kernel_command_line(p: &GuestParams) -> String {
    let safe = |s: &str| s.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.,+:~".contains(*c)).collect::<String>();
    format!(
        "console=ttyS0 panic=-1 loglevel=4 printk.devkmsg=on NBDFAULT_NBD_PORT={} NBDFAULT_CONTROL_PORT={} NBDFAULT_FS={} NBDFAULT_ONLY={} NBDFAULT_DELAY_MS={} NBDFAULT_PACKAGE={}",
        p.nbd_port,
        p.control_port,
        safe(&p.filesystems),
        safe(&p.only),
        p.delay_ms,
        safe(&p.package)
    )
}

/// The guest's `/init`: mounts, loads the modules in order, brings up the network, and for each
/// filesystem attaches `/dev/nbdN` to the export of that name with the real nbd-client, runs the
/// suite (report to the second serial port) and detaches; then powers off.
pub fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() {{ echo "nbdfault-init: $*"; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "kernel $(uname -r) booted"
for m in /lib/modules/*.ko; do
    insmod "$m" || say "insmod $m failed"
done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via {host} || say "no network"
only=""
[ -n "$NBDFAULT_ONLY" ] && only="--only $NBDFAULT_ONLY"
n=0
for fs in $(echo "$NBDFAULT_FS" | tr ',' ' '); do
    dev=/dev/nbd$n
    n=$((n + 1))
    if nbd-client {host} "$NBDFAULT_NBD_PORT" $dev -N "$fs" -b 4096 -t 60; then
        say "attached $dev to {host}:$NBDFAULT_NBD_PORT export $fs"
        nbdfault-client-tests run --device $dev --control "http://{host}:$NBDFAULT_CONTROL_PORT" \
            --export "$fs" --fs "$fs" $only --delay-ms "$NBDFAULT_DELAY_MS" \
            --kernel-package "$NBDFAULT_PACKAGE" --report /dev/ttyS1
        say "suite on $fs exited with status $?"
        sync
        nbd-client -d $dev >/dev/null 2>&1
    else
        say "nbd-client could not attach $dev to export $fs"
    fi
done
say "powering off"
poweroff -f
"#,
        host = HOST_FROM_GUEST
    )
}

/// The progress text of a console line, if the guest meant it for the user.
pub fn progress_text(line: &str) -> Option<&str> {
    let line = line.trim_end_matches(['\r', '\n']);
    PROGRESS_PREFIXES.iter().find_map(|p| line.find(p).map(|at| &line[at + p.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_carries_every_parameter_and_nothing_unsafe() {
        let line = kernel_command_line(&GuestParams {
            nbd_port: 40000,
            control_port: 40001,
            filesystems: "xfs,ext4;rm".into(),
            only: String::new(),
            delay_ms: 50,
            package: "linux-image-6.12.118+deb13-amd64".into(),
        });
        assert!(line.starts_with("console=ttyS0 "));
        assert!(line.contains(" NBDFAULT_NBD_PORT=40000 NBDFAULT_CONTROL_PORT=40001 "));
        assert!(line.contains(" NBDFAULT_FS=xfs,ext4rm "), "{line}");
        assert!(line.ends_with(" NBDFAULT_PACKAGE=linux-image-6.12.118+deb13-amd64"));
    }

    #[test]
    fn init_attaches_with_nbd_client_and_reports_on_the_second_serial_port() {
        let init = init_script();
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        assert!(init.contains("nbd-client 10.0.2.2 \"$NBDFAULT_NBD_PORT\" $dev -N \"$fs\""));
        assert!(init.contains("--report /dev/ttyS1"));
        assert!(init.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn progress_lines_are_recognised_amid_kernel_noise() {
        assert_eq!(progress_text("nbdfault: xfs: views\r\n"), Some("xfs: views"));
        assert_eq!(progress_text("[    3.1] nbdfault-init: kernel up"), Some("kernel up"));
        assert_eq!(progress_text("[    3.1] XFS (nbd0): Mounting V5 Filesystem"), None);
    }
}
