#!/usr/bin/env bash
# Capture what the health agent's per-tunnel statistics are computed from (docs/health.md):
#   tunnel_stats/first.raw, second.raw   `swanctl --list-sas --raw` of a per-pair tunnel (two
#                                         CHILD_SAs, partner-1 and partner-2) with traffic,
#                                         before and after a rekey of each child
#   tunnel_stats/charon.log              our charon's log over the same time (time_format %s,
#                                         ike_name, level 1: as ConfigureGateway configures it)
#   tunnel_stats/nat-map.json            `nft -j list map ip tunnelnat snat_map` of a table of
#                                         three mappings rendered by core/nat.py
# partner-1's rekey fails the way a PFS mismatch fails in the field: we offer ESP with a DH group
# (PFS), the partner's policy for that pair has none. The first CHILD_SA (in IKE_AUTH) carries no
# key exchange, so it comes up; its rekey (CREATE_CHILD_SA with KE) is refused. partner-2, created
# by CREATE_CHILD_SA with PFS on both sides, rekeys.
# Builds its own namespaces (tn-stat-gw, tn-stat-peer, tn-stat-nft) and removes them, also on
# failure. Needs root, strongswan-swanctl, charon-systemd, libcharon-extra-plugins, nftables.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=$here/tunnel_stats
mkdir -p "$out"
GW=tn-stat-gw PEER=tn-stat-peer NFT=tn-stat-nft
E=198.51.100.230 T=198.51.100.240 S1=203.0.113.231 S2=203.0.113.232 A_NET=192.0.2.0/24 A=192.0.2.230
PSK=lab-only-capture-psk-stats-0123456789

cleanup() {
  for ns in $GW $PEER $NFT; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns" "/run/$ns".*
  done
}
trap cleanup EXIT
cleanup

conf() {  # conf NS: strongswan.conf for one daemon with its own sockets and a log file
  cat <<CONF
include /etc/strongswan.d/*.conf
charon-systemd {
  load_modular = yes
  filelog {
    stats {
      path = /run/$1.charon.log
      time_format = %s
      ike_name = yes
      flush_line = yes
      default = 1
      enc = 0
    }
  }
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
conn() {  # conn LOCAL REMOTE TS1_LOCAL TS1_REMOTE TS2_LOCAL TS2_REMOTE ESP1 ESP2 START
  cat <<CONN
connections {
  partner {
    version = 2
    local_addrs = $1
    remote_addrs = $2
    encap = yes
    mobike = no
    unique = replace
    proposals = aes256-sha256-modp2048
    local {
      auth = psk
      id = $1
    }
    remote {
      auth = psk
      id = $2
    }
    children {
      partner-1 {
        local_ts = $3
        remote_ts = $4
        esp_proposals = $7
        start_action = $9
      }
      partner-2 {
        local_ts = $5
        remote_ts = $6
        esp_proposals = $8
        start_action = $9
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
ip -n $GW addr add $S1/32 dev lo
ip -n $GW addr add $S2/32 dev lo
ip -n $PEER addr add $A/32 dev lo
for ns in $GW $PEER; do
  mkdir -p /etc/netns/$ns/swanctl/conf.d
  conf $ns > /etc/netns/$ns/strongswan.conf
  echo 'include conf.d/*.conf' > /etc/netns/$ns/swanctl/swanctl.conf
done
PFS=aes256-sha256-modp2048 NO_PFS=aes256-sha256
conn $E $T $S1/32 $A_NET $S2/32 $A_NET $PFS $PFS start > /etc/netns/$GW/swanctl/conf.d/tunnel.conf
conn $T $E $A_NET $S1/32 $A_NET $S2/32 $NO_PFS $PFS none > /etc/netns/$PEER/swanctl/conf.d/tunnel.conf

start_charon() {
  (ip netns exec "$1" charon-systemd >/dev/null 2>&1 &)
  for _ in $(seq 100); do ip netns exec "$1" swanctl --stats >/dev/null 2>&1 && return; sleep 0.05; done
  echo "charon in $1 did not answer" >&2; exit 1
}
installed() {  # installed N: wait until N CHILD_SAs are INSTALLED
  for _ in $(seq 100); do
    [ "$(ip netns exec $GW swanctl --list-sas 2>/dev/null | grep -c INSTALLED)" -ge "$1" ] && return
    sleep 0.05
  done
  ip netns exec $GW swanctl --list-sas >&2 2>/dev/null; tail -20 /run/$GW.charon.log >&2; echo "fewer than $1 CHILD_SAs installed" >&2; exit 1
}
raw() { ip netns exec $GW swanctl --list-sas --raw 2>/dev/null; }
poke() {  # poke SRC N: N TCP connections from SRC to A's closed port: SYN out, RST back in
  ip netns exec $GW python3 -c '
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.socket(); s.settimeout(2); s.bind((sys.argv[1], 0))
    assert s.connect_ex((sys.argv[3], 9)) == 111, "no answer through the tunnel"
    s.close()' "$1" "$2" $A
}

start_charon $PEER; ip netns exec $PEER swanctl --load-all >/dev/null 2>&1
start_charon $GW; ip netns exec $GW swanctl --load-all >/dev/null 2>&1
installed 2
# Traffic both ways through each pair: 3 connections from S1, 1 from S2 (each refused by A).
poke $S1 3
poke $S2 1
sleep 1.2  # so that use-in reads at least one second
raw > "$out/first.raw"

# Rekey both pairs: partner-2's succeeds, partner-1's is refused (PFS mismatch).
ip netns exec $GW swanctl --rekey --child partner-1 >/dev/null 2>&1
ip netns exec $GW swanctl --rekey --child partner-2 >/dev/null 2>&1
sleep 1.5
poke $S1 2
poke $S2 2
sleep 1.2
raw > "$out/second.raw"
cp /run/$GW.charon.log "$out/charon.log"

# The NAT map as the gateway's table holds it (three mappings).
ip netns add $NFT
"$repo/.venv/bin/python" - <<'PY' > "/run/$NFT.rules"
import ipaddress, sys
sys.path.insert(0, "lambdas")
from tunnelnat.core.nat import GatewayBase, NatMapping, NatTable, render_nat_table
base = GatewayBase(partner_networks=(ipaddress.IPv4Network("192.0.2.0/24"),))
rows = [("10.10.1.21", "203.0.113.10"), ("10.10.1.22", "203.0.113.11"), ("10.10.1.23", "203.0.113.12")]
print(render_nat_table(base, NatTable(9, tuple(NatMapping.parse(p, s) for p, s in rows))))
PY
ip netns exec $NFT nft -f "/run/$NFT.rules"
ip netns exec $NFT nft -j list map ip tunnelnat snat_map > "$out/nat-map.json"
dpkg-query -W -f='${Package} ${Version}\n' strongswan-swanctl charon-systemd nftables > "$out/VERSION"
echo "captured into $out: $(ls "$out" | tr '\n' ' ')"
