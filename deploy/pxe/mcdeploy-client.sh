#!/bin/sh
# mcdeploy client wrapper for a Linux live/PXE system (kit version 1).
#
# Reads its settings from the kernel command line and runs the client agent:
#   mcdeploy.dp=HOST:PORT    DP agent control endpoint (required)
#   mcdeploy.out=PATH        output file or block device, e.g. /dev/sda (required)
#   mcdeploy.id=ID           client id (optional; default: the client agent's own choice)
#   mcdeploy.reboot=1        reboot after success (optional)
#   mcdeploy.shell=0         on failure, exit instead of opening a shell on the console
#
# Exit status: the client's (0 = image verified by SHA-256 and acknowledged by the DP).
# On failure the client has printed a one-line reason; on a terminal this script then
# leaves you in a shell (like the WinPE kit), otherwise it exits with that status.
#
# Overrides for testing: MCDEPLOY_CMDLINE (file to read instead of /proc/cmdline),
# MCDEPLOY_CLIENT (client command; default mcdeploy-client, else python3 -m clientagent).
set -u

say() { printf '[mcdeploy] %s\n' "$*" >&2; }

cmdline_file=${MCDEPLOY_CMDLINE:-/proc/cmdline}
dp='' out='' id='' reboot=0 shell=1

set -f  # no globbing while splitting the command line
for arg in $(cat "$cmdline_file"); do
    case $arg in
        mcdeploy.dp=*) dp=${arg#mcdeploy.dp=} ;;
        mcdeploy.out=*) out=${arg#mcdeploy.out=} ;;
        mcdeploy.id=*) id=${arg#mcdeploy.id=} ;;
        mcdeploy.reboot=*) reboot=${arg#mcdeploy.reboot=} ;;
        mcdeploy.shell=*) shell=${arg#mcdeploy.shell=} ;;
    esac
done
set +f

fail() {
    say "FAILED: $2"
    if [ "$shell" = 1 ] && [ -t 0 ]; then
        say "staying in a shell; fix the cause and run $0 again, or reboot"
        exec /bin/sh -i
    fi
    exit "$1"
}

[ -n "$dp" ] || fail 2 "no mcdeploy.dp=HOST:PORT on the kernel command line"
[ -n "$out" ] || fail 2 "no mcdeploy.out=PATH on the kernel command line"
case $out in
    /dev/*) [ -b "$out" ] || fail 2 "$out is not a block device (wrong name? missing driver?)" ;;
esac

if [ -n "${MCDEPLOY_CLIENT:-}" ]; then
    client=$MCDEPLOY_CLIENT
elif command -v mcdeploy-client >/dev/null 2>&1; then
    client=mcdeploy-client
else
    client='python3 -m clientagent'
fi

# Wait up to about 2 minutes for an IPv4 address other than loopback/link-local.
if command -v ip >/dev/null 2>&1; then
    tries=0
    until ip -4 addr 2>/dev/null | grep 'inet ' | grep -qv -e ' 127\.' -e ' 169\.254\.'; do
        tries=$((tries + 1))
        [ "$tries" -ge 60 ] && fail 3 "no IPv4 address after about 2 minutes (NIC driver? DHCP?)"
        sleep 2
    done
fi

say "receiving from $dp into $out"
if [ -n "$id" ]; then
    $client --dp "$dp" --out "$out" --id "$id"
else
    $client --dp "$dp" --out "$out"
fi
rc=$?
[ "$rc" -eq 0 ] || fail "$rc" "the client exited with status $rc; its reason is printed above"

say "image received, verified (SHA-256) and acknowledged: $out"
sync
if [ "$reboot" = 1 ]; then
    say "rebooting"
    reboot
fi
exit 0
