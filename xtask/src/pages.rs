//! The hand-written parts of the man pages, in the same man-style text as
//! the binaries' long help (a TITLE line, an indented body). A binary's
//! own help text wins: a section here is used only when the help has none
//! of that title.

/// FILES, EXAMPLES and SECURITY of each binary.
pub fn extra(name: &str) -> &'static str {
    match name {
        "qnet-hookd" => HOOKD,
        "qnetctl" => QNETCTL,
        "qnet-bridge-helper" => BRIDGE_HELPER,
        "qnet-macvtap-helper" => MACVTAP_HELPER,
        "qnet-libvirt-hook" => LIBVIRT_HOOK,
        _ => "",
    }
}

const HOOKD: &str = "\
SYSTEMD
    qnet-hookd.service runs the daemon (Type=notify: it reports READY=1 once
    every network is up) and qnet-hookd.socket holds /run/qnet/ctl.sock and
    /run/qnet/qmp.sock, so QEMUs and qnetctl may connect before the daemon
    runs and while it restarts. The daemon takes sockets passed as
    LISTEN_FDS (named ctl and qmp) and binds the paths itself otherwise.
    KillMode=process: dnsmasq outlives a restart. Logs go to the journal,
    dnsmasq's log too (it logs to the daemon, which relays each line).

EXAMPLES
    Start it by hand with the default network and debug logging:
        qnet-hookd --log debug
    As a service:
        systemctl enable --now qnet-hookd.socket qnet-hookd.service
        journalctl -u qnet-hookd
    Check an edited hookd.toml, then apply it (SIGHUP; the unit's
    ExecReload runs the check first):
        qnet-hookd --check && systemctl reload qnet-hookd

SECURITY
    The daemon runs as root with the capabilities of its unit's
    CapabilityBoundingSet. ctl.sock is root:qnet 0660: root may do
    anything, members of group qnet act only on guests whose QEMU runs
    under their own uid and forward only host ports from 1024. qmp.sock
    is 0666: any local QEMU may dial it and be followed; a NIC gets a
    reservation only on a qnet bridge its process really holds a TAP on.
    Every peer is treated as hostile; see SECURITY.md.
";

const QNETCTL: &str = "\
FILES
    /run/qnet/ctl.sock   the daemon's control socket (root:qnet 0660)

EXAMPLES
    qnetctl status
    qnetctl guests
    qnetctl reserve add qnet0 52:54:00:12:34:56 --name web1
    qnetctl forward add web1 tcp 8080:80
    qnetctl forward list --json
    qnetctl network create dev --mode isolated
    qnetctl network edit dev --dhcp-range 10.213.9.50-10.213.9.99
    qnetctl network show dev
    qnetctl network delete dev
    qnetctl reload
    qnetctl guest powerdown web1 --timeout 60

SECURITY
    Only root and members of group qnet may use the control socket. Other
    users than root see and act on their own guests only (those whose QEMU
    runs under their uid: they may also stop or power them down), and
    forward host ports from 1024 only.
";

const BRIDGE_HELPER: &str = "\
EXAMPLES
    qemu-system-x86_64 ... \\
        -netdev bridge,id=n0,br=br0,helper=/usr/libexec/qnet-bridge-helper \\
        -device virtio-net-pci,netdev=n0

SECURITY
    See PRIVILEGES. Everything the caller controls (arguments, ACL
    includes, the socket) is checked before a device is created; a
    failure leaves no device behind. Threat model: SECURITY.md.
";

const MACVTAP_HELPER: &str = "\
EXAMPLES
    MAC=52:54:00:12:34:56
    qemu-system-x86_64 ... \\
        -netdev tap,id=n0,br=eth0,helper=\"/usr/libexec/qnet-macvtap-helper --mac=$MAC\" \\
        -device virtio-net-pci,netdev=n0,mac=$MAC

SECURITY
    See PRIVILEGES. An allowed lower device may be used in every mode,
    passthru included, which takes the NIC's MAC away from the host while
    the guest runs: allow only NICs meant for guests. Threat model:
    SECURITY.md.
";

const LIBVIRT_HOOK: &str = "\
FILES
    /etc/libvirt/hooks/qemu.d/qnet   where libvirt runs it from (a link)
    /run/qnet/ctl.sock               qnet-hookd's control socket
    /run/libvirt/qemu/NAME.pid       QEMU's pid, read at `started`

EXAMPLES
    Give a libvirt guest a forward with its domain XML's metadata:
        <qnet:qnet xmlns:qnet=\"https://qnet.example/xmlns/libvirt/1\">
          <qnet:forward proto=\"tcp\" host-port=\"8080\" guest-port=\"80\"/>
        </qnet:qnet>

SECURITY
    libvirt runs it as root; qnet-hookd accepts guest registrations from
    root only. The domain XML is bounded (4 MiB), may not carry a DTD and
    may nest at most 64 elements. It never calls libvirt.
";

/// qnet-hookd.toml(5).
pub const CONFIG_PAGE: &str = "\
NAME
    qnet-hookd.toml - networks and forwards of qnet-hookd

SYNOPSIS
    /etc/qnet/hookd.toml

DESCRIPTION
    TOML. With no file at all, or a file without any [[network]] (the
    installed example is all comments, so it is such a file), qnet-hookd
    brings up one NAT network qnet0 on a free /24. Such a file never tears
    down networks configured before: the daemon refuses it while they run,
    so an emptied file cannot take every guest offline;
    default-network = true takes the default network anyway and removes the
    others, default-network = false means no network at all. Errors name
    the file, line and key, and a refused file changes nothing. Unknown keys
    are errors.

    Networks created at run time (qnetctl network create) are files
    networks.d/NAME.toml next to this file, holding the keys of one
    [[network]] table at their top level; they are checked together with
    this file. SIGHUP or qnetctl reload applies a changed file: networks
    that did not change are not touched; qnet-hookd --check validates
    without touching anything.

NETWORKS
    [[network]]
    name = \"lab\"                  # required; also the default bridge name
                                  # (1-32 of a-z A-Z 0-9 - _; not guests or users)
    bridge = \"qnlab\"              # default: the name
    mode = \"nat\"                  # nat (default) | routed | isolated | bridged
    subnet = \"10.42.0.0/24\"       # required (IPv4), except when bridged
    router = \"10.42.0.1\"          # default: the subnet's first address
    dhcp-range = [\"10.42.0.100\", \"10.42.0.199\"]   # default: .2 .. last-1
    domain = \"lab.qnet\"           # default: NAME.qnet
    uplink = \"eth0\"               # optional: masquerade/forward only via it
    blocked-ports = [\"tcp/25\"]    # outgoing ports guests may not reach
    ipv6 = { subnet = \"fd42::/64\", router = \"fd42::1\" }   # optional
    connect-to = [\"web\"]          # guests of both may connect to each other
    connect-to-one-way = [\"db\"]   # this network's guests to db's, not back

LINKS
    Networks are kept apart: a guest of one cannot open a connection to a
    guest of another (except into a routed network without uplink, or
    through a port forward). connect-to = [\"web\"] in network lab lets lab's guests
    connect to web's and web's to lab's; connect-to-one-way = [\"db\"] lets
    lab's guests connect to db's, while db's only answer. Either end may
    declare a link. Linked guests see each other's own addresses (no
    masquerade); blocked-ports and uplink do not apply to links. An
    isolated network may be linked to one way only: its guests open no
    connection beyond the host. Naming an unknown network, the network
    itself, or a network in both keys is an error; a network that is down
    has no links.

LAN NETWORKS
    [[network]]
    name = \"lan\"
    mode = \"bridged\"              # guests sit on the LAN of the uplink
    uplink = \"eth0\"               # required: the interface to share
    bridge = \"lan\"                # default: the name

    The bridge takes over the uplink's MAC, addresses and routes and
    enslaves it; the host stays reachable throughout. What the uplink had
    is kept in /var/lib/qnet/lan/NAME.json first; network down, removing
    the network and a restart after a crash give it back exactly. Guests
    lease from the LAN's own DHCP server: subnet, router, dhcp-range,
    domain, ipv6 and blocked-ports are refused here, and so are forwards
    and reservations on this network. A nat or routed network that left
    through the uplink names the bridge as its uplink instead.

FORWARDS
    [[forward]]                   # active while the guest runs
    guest = \"web1\"                # the guest's -name, or a NIC's MAC
    proto = \"tcp\"                 # tcp | udp
    ports = \"8080:80\"             # HOSTPORT[-HOSTPORT2][:GUESTPORT]
    host-addr = \"192.0.2.10\"      # optional: only this host address
    network = \"lab\"               # optional: the guest NIC's network

LIMITS
    [limits]                      # optional; these are the defaults
    auto-reservations-per-nic = 4
    reclaim-after-days = 30
    qmp-sessions-per-user = 64

FILES
    /etc/qnet/hookd.toml   this file (qnet-hookd --config moves it)
    /etc/qnet/networks.d/  networks created at run time, NAME.toml each

SEE ALSO
    qnet-hookd(8), qnetctl(1)
";
