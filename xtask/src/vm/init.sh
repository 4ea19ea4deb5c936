#!/bin/sh
# PID 1 of the test VM (installed as /sbin/lb-vm-init by `cargo xtask
# vm-test`). Mounts what the tests need, mounts the payload disk at the
# workspace path the host gave on the kernel command line (the test
# binaries find their files by absolute path), runs the payload's script,
# prints its exit status for the host to read, and powers off.
mount -t proc proc /proc
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,rw /
ip link set lo up
hostname lb-vm
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root

workspace=
for word in $(cat /proc/cmdline); do
    case "$word" in
        lb.workspace=*) workspace="${word#lb.workspace=}" ;;
    esac
done
status=1
if [ -n "$workspace" ] && mkdir -p "$workspace" && mount LABEL=lbpayload "$workspace"; then
    echo "lb-vm: kernel $(uname -r), $(nproc) CPUs, workspace $workspace"
    cd "$workspace" && sh .lb-vm/run
    status=$?
else
    echo "lb-vm: no payload disk to mount at '$workspace'"
fi
echo "LB-VM-STATUS $status"
sync
echo o > /proc/sysrq-trigger
sleep 60
