set -euo pipefail
# tunnelnat gateway boot: runs as a cloud-init bootcmd, i.e. on every boot and before the SSM
# agent starts, so the ConfigureGateway association always finds the gateway's ENI in place.
#  1. source/destination check off on the primary interface (first boot only);
#  2. attach the standalone ENI that holds G (and E), waiting for a replaced gateway to let go;
#  3. route the partner's endpoint T through that ENI, so IKE/ESP leave with source G -> E.
# On failure it marks the instance unhealthy: its Auto Scaling group replaces it, and the
# replacement is announced on the alarm topic. It never exits 0 and sits broken.
REGION='@REGION@'
ENI_ID='@ENI_ID@'
GATEWAY_IP='@GATEWAY_IP@'
SUBNET_ROUTER='@SUBNET_ROUTER@'
PARTNER_ENDPOINT='@PARTNER_ENDPOINT@'
WAIT_SECONDS=600
export HOME=/root AWS_DEFAULT_REGION="$REGION" AWS_RETRY_MODE=adaptive AWS_MAX_ATTEMPTS=10
exec > >(tee -a /var/log/tunnelnat-boot.log) 2>&1
log() { echo "tunnelnat-boot: $*"; }
imds() {
  local token
  token=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
    http://169.254.169.254/latest/api/token)
  curl -fsS -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}
INSTANCE_ID=$(imds instance-id)
fail() {
  trap - ERR
  log "FAILED: $*"
  aws autoscaling set-instance-health --instance-id "$INSTANCE_ID" --health-status Unhealthy \
    --no-should-respect-grace-period || log "could not mark $INSTANCE_ID unhealthy"
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR
eni_state() {
  aws ec2 describe-network-interfaces --network-interface-ids "$ENI_ID" --output text \
    --query 'NetworkInterfaces[0].[Status,Attachment.InstanceId,MacAddress]'
}

read -r status holder mac < <(eni_state)
if [ "$holder" != "$INSTANCE_ID" ]; then
  # Forwarded packets carry other hosts' addresses; the ENI's own check is off in the template.
  aws ec2 modify-instance-attribute --instance-id "$INSTANCE_ID" --no-source-dest-check
  deadline=$((SECONDS + WAIT_SECONDS))
  while [ "$holder" != "$INSTANCE_ID" ]; do
    if [ "$status" = available ]; then
      aws ec2 attach-network-interface --network-interface-id "$ENI_ID" \
        --instance-id "$INSTANCE_ID" --device-index 1 >/dev/null || log "attach failed, retrying"
    else
      log "$ENI_ID is $status (attached to $holder): waiting for it to be released"
    fi
    [ "$SECONDS" -lt "$deadline" ] || fail "$ENI_ID not attached after ${WAIT_SECONDS}s"
    sleep 5
    read -r status holder mac < <(eni_state)
  done
fi

dev=""
for _ in $(seq 90); do
  dev=$(ip -o link | awk -v mac="$mac" 'index(tolower($0), mac) { sub(":$", "", $2); print $2; exit }')
  if [ -n "$dev" ] && ip -4 -o addr show dev "$dev" | grep -qF " $GATEWAY_IP/"; then break; fi
  sleep 2
done
[ -n "$dev" ] || fail "no interface has the MAC address $mac of $ENI_ID"
ip -4 -o addr show dev "$dev" | grep -qF " $GATEWAY_IP/" || fail "$dev never got $GATEWAY_IP"

ip route replace "$PARTNER_ENDPOINT/32" via "$SUBNET_ROUTER" dev "$dev" src "$GATEWAY_IP"
# Keep the route if systemd-networkd reconfigures the interface (best effort).
network_file=$(networkctl status "$dev" 2>/dev/null | awk -F': ' '/Network File/ { print $2 }')
if [ -n "$network_file" ] && [ "$network_file" != "n/a" ]; then
  dropin="/etc/systemd/network/$(basename "$network_file").d"
  mkdir -p "$dropin"
  printf '[Route]\nDestination=%s/32\nGateway=%s\nPreferredSource=%s\n' \
    "$PARTNER_ENDPOINT" "$SUBNET_ROUTER" "$GATEWAY_IP" > "$dropin/tunnelnat.conf"
  networkctl reload || log "networkctl reload failed (the route is in place for this boot)"
fi
log "ready: $ENI_ID ($GATEWAY_IP) on $dev; $PARTNER_ENDPOINT routed via $dev"
