#!/usr/bin/env bash
# Capture real `nft -j list counters table ip tunnelnat` and `nft -j list set ip tunnelnat
# applied_generation` output for the health agent's tests:
# the gateway's table as nat.py renders it, loaded in a namespace of our own (tn-heal-nft),
# with the counters made to count by a few packets. Removes the namespace, also on failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
NS=tn-heal-nft
trap 'ip netns del $NS 2>/dev/null || true' EXIT
ip netns del $NS 2>/dev/null || true
ip netns add $NS
ip -n $NS link set lo up
"$repo/.venv/bin/python" - <<'PY' > /tmp/tn-heal-nft.rules
import ipaddress, sys
sys.path.insert(0, "lambdas")
from tunnelnat.core.nat import GatewayBase, NatMapping, NatTable, render_nat_table
base = GatewayBase(partner_networks=(ipaddress.IPv4Network("192.0.2.0/24"),))
table = NatTable(7, (NatMapping.parse("10.10.1.21", "203.0.113.10"),))
print(render_nat_table(base, table))
PY
ip netns exec $NS nft -f /tmp/tn-heal-nft.rules
rm -f /tmp/tn-heal-nft.rules
ip netns exec $NS nft -j list counters table ip tunnelnat > "$here/nft/empty.json"
# The applied generation (7): as every apply leaves it, then as a boot-time restore leaves it
# (the set flushed: loaded from disk, not synced yet).
ip netns exec $NS nft -j list set ip tunnelnat applied_generation > "$here/nft/generation-applied.json"
ip netns exec $NS nft flush set ip tunnelnat applied_generation
ip netns exec $NS nft -j list set ip tunnelnat applied_generation > "$here/nft/generation-empty.json"
# Count something: packets through a rule that names each counter.
ip netns exec $NS nft add chain ip tunnelnat probe '{ type filter hook output priority 0; }'
ip netns exec $NS nft add rule ip tunnelnat probe ip daddr 127.0.0.2 counter name dropped_cleartext
ip netns exec $NS nft add rule ip tunnelnat probe ip daddr 127.0.0.3 counter name dropped_unenrolled
# (TCP SYNs to a closed port: each attempt is one packet out, no ping needed.)
for _ in 1 2 3; do ip netns exec $NS bash -c 'exec 3<>/dev/tcp/127.0.0.2/9' 2>/dev/null || true; done
ip netns exec $NS bash -c 'exec 3<>/dev/tcp/127.0.0.3/9' 2>/dev/null || true
ip netns exec $NS nft -j list counters table ip tunnelnat > "$here/nft/counting.json"
ip netns exec $NS nft -j list counters table ip tunnelnat-missing > "$here/nft/missing.json" \
  2> "$here/nft/missing.stderr" || echo $? > "$here/nft/missing.rc"
ip netns exec $NS nft -j list set ip tunnelnat-missing applied_generation \
  > /dev/null 2> "$here/nft/generation-missing.stderr" || echo $? > "$here/nft/generation-missing.rc"
echo "captured into $here/nft"
