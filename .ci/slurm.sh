#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the tests: Debian's slurm-wlm + munge, installed if missing,
# one node (this machine's CPUs and memory, no GPUs) on localhost. Idempotent; needs root.
#   .ci/slurm.sh start    install if needed, write the config, start munged, slurmctld, slurmd; wait until ready
#   .ci/slurm.sh stop     stop the three daemons
#   .ci/slurm.sh status   exit 0 when the cluster answers
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-nnssl
LOGS=/var/log/slurm-nnssl

log() { echo "slurm.sh: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge (apt-get)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
}

write_config() {
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc --all)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # MiB, 10% left to the system
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS"
  cat > "$CONF_DIR/slurm.conf.new" <<CONF
# written by nnssl .ci/slurm.sh: one node = this machine, no GPUs
ClusterName=nnssl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  if ! cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf" 2>/dev/null; then
    mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
    CONFIG_CHANGED=1
  else
    rm "$CONF_DIR/slurm.conf.new"
  fi
}

running() { pgrep -x "$1" >/dev/null; }

ready() { timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

start() {
  install
  CONFIG_CHANGED=0
  write_config
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  running munged || munged --force
  if [ "$CONFIG_CHANGED" = 1 ] && running slurmctld; then
    log "configuration changed: reconfiguring"
    scontrol reconfigure || true
  fi
  running slurmctld || slurmctld
  running slurmd || slurmd
  for _ in $(seq 1 60); do
    if ready; then
      log "cluster up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T')"
      return 0
    fi
    # a node left down by an earlier stop comes back
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  log "the cluster did not come up within 30 s; see $LOGS/slurmctld.log and $LOGS/slurmd.log"
  return 1
}

stop() {
  # by the pid files the daemons write, so nothing else is touched
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) ready ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
