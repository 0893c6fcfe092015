#!/bin/busybox sh
# cube-egress guest init (PID 1), packed into the initramfs as /init by hypervisor/image.py.
#
# Stage 1 (initramfs): mount proc, sys, dev; load the modules listed in /lib/modules/cube/load-order; with
# cube.root=DEV on the kernel command line, switch to an overlay of that read-only disk under a tmpfs.
# Stage 2 (final root): network from cube.ip=ADDR/PREFIX cube.gw=GW cube.dns=DNS[,DNS] (absent: no network),
# then the guest agent, respawned whenever it exits.
# PID 1 must never exit (the kernel would panic), so nothing here uses `set -e` and every failure is logged.

if [ "$1" = stage2 ]; then BB=/.cube/busybox; AGENT=/.cube/cube-agent; else BB=/bin/busybox; AGENT=/usr/sbin/cube-agent; fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
umask 022

log() { echo "cube-init: $*" > /dev/console 2>/dev/null || echo "cube-init: $*"; }

# The value of KEY=VALUE on the kernel command line (last one wins), empty if absent.
arg() {
  v=
  for a in $($BB cat /proc/cmdline); do
    case "$a" in "$1="*) v="${a#*=}" ;; esac
  done
  echo "$v"
}

stage1() {
  $BB mkdir -p /proc /sys /dev /run /tmp
  $BB mount -t proc -o nosuid,nodev,noexec proc /proc
  $BB mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
  $BB mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
  $BB mkdir -p /dev/pts /dev/shm
  $BB mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
  $BB mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
  $BB mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
  while read -r m; do
    [ -n "$m" ] && { $BB insmod "/lib/modules/cube/$m" || log "insmod $m failed"; }
  done < /lib/modules/cube/load-order
  root=$(arg cube.root)
  if [ -n "$root" ]; then
    switch_to "$root"   # returns only if that failed
    log "could not use $root as the root disk; staying in the initramfs"
  fi
  stage2
}

switch_to() {
  i=0
  while [ ! -b "$1" ] && [ $i -lt 100 ]; do $BB usleep 50000; i=$((i + 1)); done
  $BB mkdir -p /.lower /.rw /.newroot
  $BB mount -t ext4 -o ro "$1" /.lower || return 1
  $BB mount -t tmpfs -o mode=0755 tmpfs /.rw || return 1
  $BB mkdir -p /.rw/upper /.rw/work
  $BB mount -t overlay -o lowerdir=/.lower,upperdir=/.rw/upper,workdir=/.rw/work overlay /.newroot || return 1
  n=/.newroot
  $BB mkdir -p $n/.cube $n/proc $n/sys $n/dev $n/run $n/tmp $n/etc $n/root
  # The final root's userland runs the commands; busybox, the agent and this script come along for stage 2.
  $BB cp /bin/busybox /usr/sbin/cube-agent /init $n/.cube/
  if [ -f /usr/local/share/ca-certificates/cube-egress.crt ]; then
    $BB mkdir -p $n/usr/local/share/ca-certificates $n/etc/ssl/certs
    $BB cp /usr/local/share/ca-certificates/cube-egress.crt $n/usr/local/share/ca-certificates/
    $BB cat /usr/local/share/ca-certificates/cube-egress.crt >> $n/etc/ssl/certs/ca-certificates.crt
  fi
  [ -e $n/etc/hosts ] || $BB cp /etc/hosts $n/etc/hosts
  for m in dev proc sys run; do $BB mount --move /$m $n/$m || return 1; done
  exec $BB switch_root $n /.cube/busybox sh /.cube/init stage2
}

stage2() {
  $BB ip link set dev lo up
  addr=$(arg cube.ip) gw=$(arg cube.gw) dns=$(arg cube.dns)
  if [ -n "$addr" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do $BB usleep 50000; i=$((i + 1)); done
    $BB ip addr add "$addr" dev eth0 || log "cannot set $addr on eth0"
    $BB ip link set dev eth0 up || log "cannot bring eth0 up"
    if [ -n "$gw" ]; then $BB ip route add default via "$gw" dev eth0 || log "cannot route via $gw"; fi
  fi
  if [ -n "$dns" ]; then
    : > /etc/resolv.conf.new
    for d in $(echo "$dns" | $BB tr , ' '); do echo "nameserver $d" >> /etc/resolv.conf.new; done
    $BB mv /etc/resolv.conf.new /etc/resolv.conf
  fi
  cd /
  while :; do
    $AGENT --system --busybox $BB < /dev/null > /dev/console 2>&1
    log "agent exited with status $?; restarting it"
    $BB sleep 1
  done
}

if [ "$1" = stage2 ]; then stage2; else stage1; fi
