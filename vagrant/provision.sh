#!/bin/sh
# Provisions a node of the Vagrant cluster (see README.md here), in phases:
#
#   provision.sh install DEB
#       Docker (Debian's docker.io), what lbd needs, lbd's package DEB and
#       its settings; docker.service and lbd.service enabled, nothing
#       started. Needs no running system: it also runs in a chroot, as
#       `chroot ROOT /bin/sh /tmp/provision.sh install /tmp/lb.deb`.
#   provision.sh swarm manager MANAGER_ADDR PUBLIC_KEY
#   provision.sh swarm worker MANAGER_ADDR PRIVATE_KEY
#       Starts Docker, forms the Swarm advertising MANAGER_ADDR (manager)
#       or joins it (worker), then starts lbd. The manager lets the key
#       fetch the worker join token over SSH, and nothing else; a worker
#       fetches it with the key, waiting for the manager if need be.
#   provision.sh deploy STACK_FILE ADDR...
#       On the manager: deploys STACK_FILE as the stack "demo" and shows its
#       published port answering on each ADDR.
#
# Every phase may run again: it does only what is missing or changed.
set -eu

# The account on the manager that hands out the worker join token.
TOKEN_USER=lb-swarm
# Seconds a worker waits for the manager's token: the nodes may come up in
# parallel, and the manager installs Docker before it forms the Swarm.
JOIN_WAIT=${LB_JOIN_WAIT:-900}
# Seconds deploy waits for the service to answer (its image is pulled).
DEPLOY_WAIT=${LB_DEPLOY_WAIT:-300}
# Overlay subnets away from VirtualBox's NAT network (10.0.2.0/24), which
# Swarm's default pool (10.0.0.0/8, a /24 per network from 10.0.0.0 on)
# reaches by its third network.
ADDR_POOL=10.200.0.0/16
STACK=demo
SERVICE=${STACK}_web

say() { printf 'provision: %s\n' "$*"; }
die() {
    printf 'provision: %s\n' "$*" >&2
    exit 1
}
# Arguments are checked with builtins alone, before anything is run.
usage() {
    printf 'usage: %s install DEB\n' "$0" >&2
    printf '       %s swarm manager MANAGER_ADDR PUBLIC_KEY\n' "$0" >&2
    printf '       %s swarm worker MANAGER_ADDR PRIVATE_KEY\n' "$0" >&2
    printf '       %s deploy STACK_FILE ADDR...\n' "$0" >&2
    exit 2
}

# apt-get that waits for another apt run (unattended upgrades at first
# boot) and keeps /etc/default/lbd as this script wrote it.
apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -q \
        -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "$@"
}

# Packages' maintainer scripts start their services unless policy-rc.d
# says no (101), with or without systemd running; in a chroot they would
# start dockerd from its init script. An existing policy-rc.d is left as
# it is.
forbid_service_starts() {
    [ ! -e /usr/sbin/policy-rc.d ] || return 0
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'exit 1' HUP INT TERM
}

# Sets KEY=VALUE in /etc/default/lbd, in place of any earlier value; the
# package's comments stay.
set_default() {
    file=/etc/default/lbd
    touch "$file"
    sed -i "/^$1=/d" "$file"
    printf '%s=%s\n' "$1" "$2" >>"$file"
}

# systemctl enable works without systemd running (in a chroot too); where
# systemctl itself is missing, the symlink it would make is made here.
enable_unit() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl enable "$1"
        return
    fi
    for dir in /etc/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
        [ -f "$dir/$1" ] || continue
        sed -n 's/^WantedBy=//p' "$dir/$1" | tr ' ' '\n' | while read -r target; do
            [ -n "$target" ] || continue
            mkdir -p "/etc/systemd/system/$target.wants"
            ln -sf "$dir/$1" "/etc/systemd/system/$target.wants/$1"
        done
        return
    done
    die "no unit $1 to enable"
}

install_phase() {
    deb=$1
    # apt takes a file by a path only (a bare name is a package name).
    case $deb in /*) ;; *) deb=$PWD/$deb ;; esac
    forbid_service_starts
    # Docker, certificates to pull images with, iproute2 (which the package
    # recommends), ssh for the join token and curl for the checks here.
    # Fetched only when one is missing: a node (or image) that has them all
    # is provisioned again offline.
    missing=
    for pkg in docker.io ca-certificates iproute2 openssh-client curl; do
        dpkg-query -W -f '${Status}\n' "$pkg" 2>/dev/null | grep -q ' installed$' ||
            missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        say "installing$missing"
        apt_get update
        # shellcheck disable=SC2086 # one word per package
        apt_get install -y --no-install-recommends $missing
    fi
    # --reinstall: a package rebuilt with the same version replaces the
    # installed one.
    say "installing $deb"
    apt_get install -y --no-install-recommends --reinstall "$deb"
    # lbd serves the Swarm's published ports and VIPs (and labelled
    # containers'); metrics and the stats page on loopback only.
    set_default LBD_DOCKER 1
    set_default LBD_METRICS 127.0.0.1:9107
    enable_unit docker.service
    enable_unit lbd.service
}

fail_unit() {
    journalctl -u "$1" -n 40 --no-pager >&2 || true
    die "$1 did not start"
}

swarm_state() {
    docker info --format '{{.Swarm.LocalNodeState}}'
}

# "IFACE ADDR": the interface and address this node reaches the manager
# from, or holds the manager's address on.
node_link() {
    held=$(ip -o -4 addr show to "$1/32" | awk '{ print $2; exit }')
    if [ -n "$held" ]; then
        echo "$held $1"
        return
    fi
    ip -o -4 route get "$1" | awk '{
        for (i = 1; i < NF; i++) {
            if ($i == "dev") dev = $(i + 1)
            if ($i == "src") src = $(i + 1)
        }
    } END { if (dev != "" && src != "") print dev, src }'
}

swarm_phase() {
    role=$1 manager=$2 key=$3
    [ -d /run/systemd/system ] || die "the swarm phase needs a running systemd"
    link=$(node_link "$manager")
    [ -n "$link" ] || die "no route to the manager at $manager"
    iface=${link% *} addr=${link#* }
    say "this node: $addr on $iface"

    systemctl start docker.service || fail_unit docker.service
    case $role in
    manager) form_swarm "$manager" "$key" ;;
    worker) join_swarm "$manager" "$addr" "$key" ;;
    esac

    # Only the cluster's network: Docker's own bridges and veths need no
    # datapath of their own (lbd attaches inside ingress_sbox by itself).
    set_default LBD_IFACE "$iface"
    systemctl enable lbd.service
    # A restart, not a start: it takes a new package or settings, and lbd
    # keeps the datapath and its connections across it.
    systemctl restart lbd.service || fail_unit lbd.service
    lbctl status
}

form_swarm() {
    if [ "$(swarm_state)" != active ]; then
        say "docker swarm init --advertise-addr $1"
        docker swarm init --advertise-addr "$1" \
            --default-addr-pool "$ADDR_POOL" --default-addr-pool-mask-length 24
    fi
    # The key's one use: sshd runs this command whatever the client asks,
    # with no terminal or forwarding.
    id "$TOKEN_USER" >/dev/null 2>&1 ||
        useradd --system --create-home --shell /bin/sh --groups docker \
            --password "*" "$TOKEN_USER"
    home=$(getent passwd "$TOKEN_USER" | cut -d: -f6)
    install -d -m 700 -o "$TOKEN_USER" "$home/.ssh"
    printf 'command="docker swarm join-token -q worker",restrict %s\n' \
        "$(cut -d' ' -f1,2 "$2")" >"$home/.ssh/authorized_keys"
    chown "$TOKEN_USER" "$home/.ssh/authorized_keys"
    chmod 600 "$home/.ssh/authorized_keys"
    say "$TOKEN_USER@$1 hands out the worker join token"
}

# The manager answers once it is up and in its Swarm; until then the
# connection or the command fails and the loop tries again.
join_swarm() {
    manager=$1 addr=$2 key=$3
    # ssh refuses a private key others can read.
    chmod 600 "$key"
    deadline=$(($(date +%s) + JOIN_WAIT))
    until [ "$(swarm_state)" = active ]; do
        state=$(swarm_state)
        case $state in
        inactive)
            # The manager's host key is not known in advance; the token is
            # only good on this private network.
            if token=$(ssh -i "$key" -o BatchMode=yes -o ConnectTimeout=5 \
                -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
                -o LogLevel=ERROR "$TOKEN_USER@$manager" 2>/dev/null) && [ -n "$token" ]; then
                say "docker swarm join $manager:2377"
                docker swarm join --advertise-addr "$addr" --token "$token" "$manager:2377" &&
                    continue
            else
                say "waiting for the manager at $manager to hand out the join token"
            fi
            ;;
        pending) ;;
        *) die "Swarm state $state: leave it (docker swarm leave --force) and provision again" ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] ||
            die "not in the Swarm after ${JOIN_WAIT}s; is the manager (node1) up?"
        sleep 5
    done
    say "in the Swarm"
}

# The published port's answer's "Name:" line (the task's name), or
# nothing.
task_name() {
    curl -fsS --max-time 2 "http://$1/" 2>/dev/null | sed -n 's/^Name: //p'
}

deploy_phase() {
    stack_file=$1
    shift
    [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] ||
        die "deploy runs on a Swarm manager"
    say "docker stack deploy -c $stack_file $STACK"
    docker stack deploy --compose-file "$stack_file" "$STACK"
    port=$(docker service inspect --format \
        '{{range .Endpoint.Spec.Ports}}{{.PublishedPort}} {{end}}' "$SERVICE")
    port=${port%% *}
    [ -n "$port" ] || die "$SERVICE publishes no port"

    # The first address is this node's: it answers once a task runs, and
    # lbd shows the service once it has read it from Swarm.
    deadline=$(($(date +%s) + DEPLOY_WAIT))
    until lbctl status "$SERVICE" >/dev/null 2>&1 && [ -n "$(task_name "$1:$port")" ]; do
        [ "$(date +%s)" -lt "$deadline" ] ||
            die "$SERVICE does not answer on $1:$port after ${DEPLOY_WAIT}s"
        sleep 2
    done
    docker service ps --filter desired-state=running "$SERVICE"
    lbctl status "$SERVICE"
    for a in "$@"; do
        echo
        echo "curl http://$a:$port/   (6 requests, the task that answered each)"
        for _ in 1 2 3 4 5 6; do
            name=$(task_name "$a:$port")
            echo "  ${name:-no answer (is the node up?)}"
        done
    done
}

[ $# -ge 1 ] || usage
phase=$1
shift
case $phase in
install)
    [ $# -eq 1 ] || usage
    [ -f "$1" ] || die "no package at $1 (cargo xtask package builds it)"
    [ "$(id -u)" = 0 ] || die "run as root"
    install_phase "$1"
    ;;
swarm)
    [ $# -eq 3 ] || usage
    case $1 in manager | worker) ;; *) usage ;; esac
    [ -f "$3" ] || die "no key at $3"
    [ "$(id -u)" = 0 ] || die "run as root"
    swarm_phase "$1" "$2" "$3"
    ;;
deploy)
    [ $# -ge 2 ] || usage
    [ -f "$1" ] || die "no stack file at $1"
    [ "$(id -u)" = 0 ] || die "run as root"
    deploy_phase "$@"
    ;;
*) usage ;;
esac
