#!/usr/bin/env bash
# Emulated hosts on one machine, for multi-node runs without a cluster: Linux network namespaces
# (needs root), each with its own address on a bridge, and an rsh agent that lets Open MPI start
# ranks "on" them as it would over ssh.
#   scripts/netns-cluster.sh up N [NAME]    N hosts NAME-h1..NAME-hN at 10.R.0.1..N/24 (R from NAME);
#                                           prints the folder holding `hosts` (a hostfile, slots=8
#                                           each), `agent` (the rsh agent), `mpirun-args` and `subnet`
#   scripts/netns-cluster.sh down [NAME]    removes the namespaces, the bridge and the folder
#   scripts/netns-cluster.sh exec HOST CMD  runs CMD inside HOST's namespace, hostname HOST
#   scripts/netns-cluster.sh link HOST up|down   takes a host's link up or down (a partition)
#   scripts/netns-cluster.sh slurm NAME CTLD NODE...   Slurm on the hosts: slurmctld on CTLD,
#                                           slurmd on each NODE (auth/none: a test cluster);
#                                           prints the slurm.conf for SLURM_CONF
# Open MPI across the hosts: PMIX_MCA_gds=hash mpirun $(cat DIR/mpirun-args) --hostfile DIR/hosts
# -np ... (the agent enters a namespace instead of ssh; TCP between ranks stays on the subnet).
# NAME defaults to kvtp; the host names are NAME-h1.., the namespaces the same.
set -euo pipefail
cmd=${1:-}

# 10.R.0.0/24 with R in 100..199 from the name, so clusters of different names do not collide.
subnet_of() { echo "10.$((100 + $(echo -n "$1" | cksum | cut -d' ' -f1) % 100)).0"; }

case "$cmd" in
up)
  n=${2:?usage: netns-cluster.sh up N [NAME]}
  name=${3:-kvtp}
  dir=/tmp/netns-cluster-$name
  net=$(subnet_of "$name")
  bridge="br-$(echo -n "$name" | cksum | cut -c1-8)"
  "$0" down "$name" >/dev/null 2>&1 || true
  mkdir -p "$dir"
  echo "$bridge" > "$dir/bridge"
  echo "$net.0/24" > "$dir/subnet"
  ip link add "$bridge" type bridge
  ip addr add "$net.254/24" dev "$bridge"
  ip link set "$bridge" up
  : > "$dir/hosts"
  for i in $(seq "$n"); do
    host="$name-h$i" veth="v$(echo -n "$name" | cksum | cut -c1-6)h$i"
    ip netns add "$host"
    ip link add "$veth" type veth peer name eth0 netns "$host"
    ip link set "$veth" master "$bridge" up
    ip -n "$host" addr add "$net.$i/24" dev eth0
    ip -n "$host" link set eth0 up
    ip -n "$host" link set lo up
    echo "$veth" > "$dir/$host.veth"
    echo "$net.$i" > "$dir/$host.addr"
    echo "$host slots=8" >> "$dir/hosts"
  done
  # The rsh agent: Open MPI calls `agent HOST command...`; run it in HOST's namespace, under
  # HOST's own hostname (a UTS namespace), as ssh would on that host.
  cat > "$dir/agent" <<EOF
#!/bin/sh
host=\$1; shift
exec ip netns exec "\$host" unshare --uts sh -c "hostname \$host; \$*"
EOF
  chmod +x "$dir/agent"
  # routed=direct: each daemon talks to mpirun itself (the default tree routing failed here);
  # rtc ^hwloc: daemons of one machine writing hwloc's topology to shared memory at one address
  # crashed one start in ~12; PMIx's hash store: its shared-memory store errs across namespaces.
  echo "--allow-run-as-root --mca plm_rsh_agent $dir/agent --mca routed direct --mca rtc ^hwloc --mca btl tcp,self" \
       "--mca btl_tcp_if_include $net.0/24 --mca oob_tcp_if_include $net.0/24 -x PMIX_MCA_gds=hash" > "$dir/mpirun-args"
  echo "$dir"
  ;;
down)
  name=${2:-kvtp}
  dir=/tmp/netns-cluster-$name
  if [ -f "$dir/hosts" ]; then
    for host in $(cut -d' ' -f1 "$dir/hosts"); do
      ip netns pids "$host" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
      ip netns del "$host" 2>/dev/null || true
    done
  fi
  [ -f "$dir/bridge" ] && ip link del "$(cat "$dir/bridge")" 2>/dev/null || true
  rm -rf "$dir"
  ;;
exec)
  host=${2:?usage: netns-cluster.sh exec HOST CMD...}
  shift 2
  exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$host" "$@"
  ;;
slurm)
  name=${2:?usage: netns-cluster.sh slurm NAME CTLD NODE...}
  ctld=${3:?usage: netns-cluster.sh slurm NAME CTLD NODE...}
  shift 3
  dir=/tmp/netns-cluster-$name
  conf=$dir/slurm
  mkdir -p "$conf/state" "$conf/log"
  nodes=$(IFS=,; echo "$*")
  {
    echo "ClusterName=kvtp"
    echo "SlurmctldHost=$ctld($(cat "$dir/$ctld.addr"))"
    echo "AuthType=auth/none"
    echo "CredType=cred/none"
    echo "SlurmUser=root"
    echo "StateSaveLocation=$conf/state"
    echo "SlurmdSpoolDir=$conf/spool-%n"
    echo "SlurmctldPidFile=$conf/slurmctld.pid"
    echo "SlurmdPidFile=$conf/slurmd-%n.pid"
    echo "SlurmctldLogFile=$conf/log/slurmctld.log"
    echo "SlurmdLogFile=$conf/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "SelectType=select/linear"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    for node in "$@"; do echo "NodeName=$node NodeAddr=$(cat "$dir/$node.addr") CPUs=$(nproc) State=UNKNOWN"; done
    echo "PartitionName=main Nodes=$nodes Default=YES MaxTime=INFINITE State=UP"
  } > "$conf/slurm.conf"
  printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n' > "$conf/cgroup.conf"
  "$0" exec "$ctld" slurmctld -f "$conf/slurm.conf" -i
  # Each slurmd reads a copy of the configuration whose mpi.conf gives PMIx a folder of its own:
  # the hosts share /tmp, where PMIx's default folder names would collide.
  for node in "$@"; do
    mkdir -p "$conf/$node" "$conf/pmix-$node"
    cp "$conf/slurm.conf" "$conf/cgroup.conf" "$conf/$node/"
    echo "PMIxCliTmpDirBase=$conf/pmix-$node" > "$conf/$node/mpi.conf"
    "$0" exec "$node" slurmd -f "$conf/$node/slurm.conf"
  done
  for _ in $(seq 50); do
    SLURM_CONF=$conf/slurm.conf "$0" exec "$ctld" sinfo -h -o %T 2>/dev/null | grep -q idle && break
    sleep 0.2
  done
  echo "$conf/slurm.conf"
  ;;
link)
  host=${2:?usage: netns-cluster.sh link HOST up|down}
  state=${3:?usage: netns-cluster.sh link HOST up|down}
  ip netns exec "$host" ip link set eth0 "$state"
  ;;
*)
  sed -n '2,14p' "$0" >&2
  exit 2
  ;;
esac
