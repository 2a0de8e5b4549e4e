# The gateway software this document was synthesized with (tools/gateway_package.py binds the
# placeholder): LIB/gateway/<sha256>.pyz, content-addressed, so a run never sees it change.
# LIB is /etc/tunnelnat/lib (TUNNELNAT_LIB elsewhere: tests; install_package.py reads it too).
# make documents embeds this file in every gateway document; ``pkg_installed`` false: the
# document installs it (gateway/install_package.py) before running its verb.
pkg_sha256=__TUNNELNAT_PACKAGE_SHA256__
pkg="${TUNNELNAT_LIB:-/etc/tunnelnat/lib}/gateway/$pkg_sha256.pyz"
pkg_installed() { [ "$(sha256sum "$pkg" 2>/dev/null | cut -c1-64)" = "$pkg_sha256" ]; }
# A new gateway: cloud-init may still be installing python3 and boto3. Wait (bounded; exit 2 is
# "done with recoverable errors"); the verbs report what it said (TN_CLOUD_INIT).
cloud_init=none
if command -v cloud-init >/dev/null 2>&1; then
  cloud_init=done
  timeout 600 cloud-init status --wait >/dev/null 2>&1 || case $? in
    2) cloud_init=degraded ;;
    124) cloud_init="still running after 600s" ;;
    *) cloud_init=error ;;
  esac
fi
export TN_CLOUD_INIT="$cloud_init"
command -v python3 >/dev/null || fail "python3 is not installed (cloud-init: $cloud_init)"
