#!/usr/bin/env bash
# Capture real `swanctl --list-sas` output for the health agent's parser tests.
#
# Builds two namespaces of its own (tn-heal-gw, the initiator with S on lo, and tn-heal-peer),
# runs one charon-systemd in each (kernel-libipsec, per LAB-NOTES), and records what the
# gateway side's swanctl prints in each state the agent must read:
#   established        IKE SA ESTABLISHED, child SA INSTALLED
#   child-missing      IKE SA ESTABLISHED, child SA terminated
#   connecting         the peer's charon is dead: our IKE SA is CONNECTING (retransmitting)
#   rekeying           right after --rekey (two child SAs of one name, when caught)
#   charon-dead        our charon was killed -9: the vici socket refuses
# Every file is stdout; *.rc and *.stderr beside it. Removes everything it made, also on failure.
# Needs root, strongswan-swanctl, charon-systemd, libcharon-extra-plugins.
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/swanctl
mkdir -p "$out"
GW=tn-heal-gw PEER=tn-heal-peer
E=198.51.100.210 T=198.51.100.220 S=203.0.113.210 A_NET=192.0.2.0/24 A=192.0.2.210
PSK=lab-only-capture-psk-0123456789

cleanup() {
  for ns in $GW $PEER; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns" "/run/$ns".*
  done
}
trap cleanup EXIT
cleanup

conf() {  # conf NS: strongswan.conf for one daemon with its own sockets
  cat <<CONF
include /etc/strongswan.d/*.conf
charon-systemd {
  load_modular = yes
  plugins {
    include /etc/strongswan.d/charon/*.conf
    kernel-libipsec {
      load = yes
    }
    forecast {
      load = no
    }
    vici {
      socket = unix:///run/$1.vici
    }
    lookip {
      socket = unix:///run/$1.lkp
    }
    error-notify {
      socket = unix:///run/$1.enfy
    }
  }
}
swanctl {
  socket = unix:///run/$1.vici
}
CONF
}
conn() {  # conn LOCAL REMOTE LOCAL_TS REMOTE_TS START
  cat <<CONN
connections {
  partner {
    version = 2
    local_addrs = $1
    remote_addrs = $2
    encap = yes
    mobike = no
    dpd_delay = 10s
    unique = replace
    local {
      auth = psk
      id = $1
    }
    remote {
      auth = psk
      id = $2
    }
    children {
      partner {
        local_ts = $3
        remote_ts = $4
        esp_proposals = aes256-sha256
        dpd_action = restart
        start_action = $5
      }
    }
  }
}
secrets {
  ike-partner {
    id-1 = $1
    id-2 = $2
    secret = "$PSK"
  }
}
CONN
}

ip netns add $GW; ip netns add $PEER
ip -n $GW link add eth0 type veth peer name eth0 netns $PEER
ip -n $GW addr add $E/24 dev eth0; ip -n $PEER addr add $T/24 dev eth0
for ns in $GW $PEER; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
ip -n $GW route add default dev eth0
ip -n $PEER route add default dev eth0
ip -n $GW addr add $S/32 dev lo
ip -n $PEER addr add $A/32 dev lo
for ns in $GW $PEER; do
  mkdir -p /etc/netns/$ns/swanctl/conf.d
  conf $ns > /etc/netns/$ns/strongswan.conf
  echo 'include conf.d/*.conf' > /etc/netns/$ns/swanctl/swanctl.conf
done
conn $E $T $S/32 $A_NET start > /etc/netns/$GW/swanctl/conf.d/tunnel.conf
conn $T $E $A_NET $S/32 none > /etc/netns/$PEER/swanctl/conf.d/tunnel.conf

start_charon() {
  (ip netns exec "$1" charon-systemd >"/run/$1.log" 2>&1 &)
  for _ in $(seq 100); do ip netns exec "$1" swanctl --stats >/dev/null 2>&1 && return; sleep 0.05; done
  echo "charon in $1 did not answer" >&2; exit 1
}
capture() {  # capture NAME: plain and raw listings, with their exit codes and stderr
  for mode in plain raw; do
    flag=(); [ $mode = raw ] && flag=(--raw)
    rc=0
    ip netns exec $GW timeout 5 swanctl --list-sas "${flag[@]}" >"$out/$1.$mode" 2>"$out/$1.$mode.stderr" || rc=$?
    echo $rc > "$out/$1.$mode.rc"
  done
}
wait_installed() {
  for _ in $(seq 100); do
    ip netns exec $GW swanctl --list-sas 2>/dev/null | grep -q "INSTALLED" && return; sleep 0.05
  done
  echo "child SA did not install" >&2; exit 1
}

start_charon $PEER; ip netns exec $PEER swanctl --load-all >/dev/null 2>&1
start_charon $GW; ip netns exec $GW swanctl --load-all >/dev/null 2>&1
wait_installed
sleep 0.5
capture established

# Rekeying: for a moment the old and the new child SA exist together (make-before-break).
ip netns exec $GW swanctl --rekey --child partner >/dev/null 2>&1 || true
for _ in $(seq 40); do
  capture rekeying
  [ "$(grep -c 'state=INSTALLED\|state=REKEYED\|state=REKEYING\|state=DELETING' "$out/rekeying.raw")" -ge 1 ] \
    && [ "$(grep -o 'name=partner' "$out/rekeying.raw" | wc -l)" -ge 2 ] && break
  sleep 0.005
done
sleep 0.5

ip netns exec $GW swanctl --terminate --child partner --timeout 5 >/dev/null
sleep 0.3
capture child-missing

# Peer gone: re-initiating from our side leaves an IKE SA CONNECTING (retransmits unanswered).
for pid in $(ip netns pids $PEER); do kill -9 "$pid"; done
ip netns exec $GW swanctl --terminate --ike partner --timeout 5 >/dev/null 2>&1 || true
ip netns exec $GW swanctl --initiate --child partner --timeout 1 >/dev/null 2>&1 || true
sleep 0.3
capture connecting

for pid in $(ip netns pids $GW); do kill -9 "$pid"; done
sleep 0.3
capture charon-dead
dpkg-query -W -f='${Package} ${Version}\n' strongswan-swanctl charon-systemd > "$out/VERSION"
echo "captured into $out: $(ls "$out" | tr '\n' ' ')"
