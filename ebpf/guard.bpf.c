// cube-egress kernel enforcement: one tc program (host side of VM/container sandboxes) and cgroup programs
// (process sandboxes), compiled by bcc. Python (ebpf/_build.py) prepends the generated `enum cxe_code`
// (from ebpf/reasons.py, the one registry of verdict codes) and the CXE_* constants before compiling.
//
// Per-sandbox settings live in maps, so one loaded program serves every sandbox of a network namespace.
// Everything not explicitly passed is dropped (TC_ACT_SHOT) or refused (return 0): fail closed.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

// Wire formats, spelled out here instead of including the kernel's network headers (that halves compile time).
struct cxe_eth {
    u8 dst[6];
    u8 src[6];
    u16 proto;
} __attribute__((packed));

struct cxe_ip {
    u8 ver_ihl;
    u8 tos;
    u16 tot_len;
    u16 id;
    u16 frag_off;
    u8 ttl;
    u8 protocol;
    u16 check;
    u32 saddr;
    u32 daddr;
};

struct cxe_ip6 {
    u32 ver_tc_flow;
    u16 payload_len;
    u8 nexthdr;
    u8 hop_limit;
    u32 saddr[4];
    u32 daddr[4];
};

struct cxe_tcp {
    u16 source;
    u16 dest;
    u32 seq;
    u32 ack_seq;
    u8 doff;
    u8 flags;               // CWR ECE URG ACK PSH RST SYN FIN
    u16 window;
};

struct cxe_l4 {               // UDP, and the first bytes of ICMP (type, code)
    u16 source;
    u16 dest;
};

#define CXE_TCP_SYN 0x02
#define CXE_TCP_ACK 0x10
#define CXE_IPPROTO_ICMP 1
#define CXE_IPPROTO_TCP 6
#define CXE_IPPROTO_UDP 17
#define CXE_ICMP_ECHOREPLY 0
#define CXE_ICMP_DEST_UNREACH 3
#define CXE_ICMP_ECHO 8
#define CXE_ICMP_TIME_EXCEEDED 11

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define CXE_NTOHS(x) ((u16)__builtin_bswap16((u16)(x)))
#define CXE_HTONS(x) ((u16)__builtin_bswap16((u16)(x)))
#else
#define CXE_NTOHS(x) ((u16)(x))
#define CXE_HTONS(x) ((u16)(x))
#endif

#define CXE_ETH_P_IP 0x0800
#define CXE_ETH_P_ARP 0x0806
#define CXE_ETH_P_IPV6 0x86DD
#define CXE_ETH_P_8021Q 0x8100
#define CXE_ETH_P_8021AD 0x88A8
#define CXE_IP_MF 0x2000
#define CXE_IP_OFFSET 0x1FFF

#define CXE_HOOK_TC 1
#define CXE_HOOK_CONNECT4 2
#define CXE_HOOK_SENDMSG4 3
#define CXE_HOOK_CONNECT6 4
#define CXE_HOOK_SENDMSG6 5

// Per-sandbox settings. Addresses in network byte order, ports in host byte order (0 = none).
// Layout mirrored by ebpf/_layout.py (SANDBOX); explicit padding, no implicit holes.
struct cxe_sandbox {
    u32 slot;               // small id chosen by user space; keys counters and ports
    u32 sandbox_ip;
    u32 gateway_ip;
    u16 proxy_port;
    u16 transparent_port;
    u16 dns_port;
    u8 mac[6];
    u16 flags;
    char id[CXE_ID_LEN];
    char ifname[16];        // tc: the interface name at attach time (for detach and verify)
};

struct cxe_port_key {
    u32 slot;
    u16 port;               // host order
    u16 pad;
};

struct cxe_count_key {
    u32 slot;
    u32 code;
};

struct cxe_rate {
    u64 window_ns;
    u32 sent;
    u32 pad;
};

// One drop/refusal report. Mirrored by ebpf/_layout.py (EVENT).
struct cxe_event {
    u64 ts_ns;              // bpf_ktime_get_ns()
    u64 cgroup_id;          // cgroup hooks: the calling task's cgroup
    u32 slot;
    u32 code;
    u32 ifindex;            // tc hook: the interface
    u32 saddr;              // IPv4, network order
    u32 daddr;
    u32 daddr6[4];          // IPv6 destination (IPv6 frames, connect6/sendmsg6)
    u16 sport;              // host order
    u16 dport;
    u16 ethertype;          // host order (tc hook)
    u8 proto;               // IPPROTO_* or 0
    u8 hook;                // CXE_HOOK_*
    u8 smac[6];
    u8 family;              // 4, 6 or 0 (not IP)
    u8 pad;
    char id[CXE_ID_LEN];
};

struct cxe_orig {
    u32 daddr;              // original destination, network order
    u16 dport;              // host order
    u16 pad;
    u32 slot;
    u32 pad2;
    u64 cookie;
};

struct cxe_peer_key {
    u32 addr;               // client (sandbox process) address, network order
    u16 port;               // client port, host order
    u16 pad;
};

BPF_HASH(cxe_ifaces, u32, struct cxe_sandbox, CXE_MAX_SANDBOXES);          // ifindex -> settings (tc)
BPF_HASH(cxe_cgroups, u64, struct cxe_sandbox, CXE_MAX_SANDBOXES);         // cgroup id -> settings
BPF_HASH(cxe_ports, struct cxe_port_key, u8, CXE_MAX_PORTS);               // (slot, port) -> 1: redirected TCP ports
BPF_PERCPU_HASH(cxe_counters, struct cxe_count_key, u64, CXE_MAX_COUNTERS);
BPF_HASH(cxe_ratelimit, struct cxe_count_key, struct cxe_rate, CXE_MAX_COUNTERS);
BPF_ARRAY(cxe_meta, u64, 2);                                               // [0] source hash, [1] reserved
BPF_TABLE("lru_hash", u64, struct cxe_orig, cxe_origdst, CXE_MAX_ORIGDST);          // socket cookie -> original
BPF_TABLE("lru_hash", struct cxe_peer_key, struct cxe_orig, cxe_origpeer, CXE_MAX_ORIGDST); // client addr -> original
BPF_RINGBUF_OUTPUT(cxe_events, CXE_RINGBUF_PAGES);

static __always_inline void cxe_count(u32 slot, u32 code) {
    struct cxe_count_key k = {.slot = slot, .code = code};
    u64 *v = cxe_counters.lookup(&k);
    if (v) {
        *v += 1;
        return;
    }
    u64 one = 1;
    if (cxe_counters.update(&k, &one) != 0) {  // lost a race to another CPU's insert
        v = cxe_counters.lookup(&k);
        if (v)
            *v += 1;
    }
}

// At most CXE_EVENTS_PER_SEC reports per (sandbox, reason) and second; counters stay exact.
static __always_inline int cxe_rate_ok(u32 slot, u32 code) {
    struct cxe_count_key k = {.slot = slot, .code = code};
    u64 now = bpf_ktime_get_ns();
    struct cxe_rate *r = cxe_ratelimit.lookup(&k);
    if (!r) {
        struct cxe_rate init = {.window_ns = now, .sent = 1};
        cxe_ratelimit.update(&k, &init);
        return 1;
    }
    if (now - r->window_ns > 1000000000ULL) {
        r->window_ns = now;
        r->sent = 1;
        return 1;
    }
    if (r->sent >= CXE_EVENTS_PER_SEC)
        return 0;
    r->sent += 1;
    return 1;
}

static __always_inline void cxe_copy_id(char *dst, const struct cxe_sandbox *cfg) {
    if (cfg)
        bpf_probe_read_kernel(dst, CXE_ID_LEN, cfg->id);
}

// ----------------------------------------------------------------------------------------------------------
// tc ingress on the host side of a sandbox interface: every frame the sandbox sends.

struct cxe_pkt {
    u32 ifindex;
    u32 saddr, daddr;
    u32 daddr6[4];
    u16 sport, dport, ethertype;
    u8 proto, family;
    u8 smac[6];
};

static __always_inline void cxe_tc_report(const struct cxe_sandbox *cfg, u32 slot, u32 code, struct cxe_pkt *p) {
    if (!cxe_rate_ok(slot, code))
        return;
    struct cxe_event *ev = cxe_events.ringbuf_reserve(sizeof(struct cxe_event));
    if (!ev)
        return;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->ts_ns = bpf_ktime_get_ns();
    ev->slot = slot;
    ev->code = code;
    ev->ifindex = p->ifindex;
    ev->saddr = p->saddr;
    ev->daddr = p->daddr;
    ev->daddr6[0] = p->daddr6[0];
    ev->daddr6[1] = p->daddr6[1];
    ev->daddr6[2] = p->daddr6[2];
    ev->daddr6[3] = p->daddr6[3];
    ev->sport = p->sport;
    ev->dport = p->dport;
    ev->ethertype = p->ethertype;
    ev->proto = p->proto;
    ev->family = p->family;
    ev->hook = CXE_HOOK_TC;
    __builtin_memcpy(ev->smac, p->smac, 6);
    cxe_copy_id(ev->id, cfg);
    cxe_events.ringbuf_submit(ev, 0);
}

static __always_inline int cxe_mac_eq(const u8 *a, const u8 *b) {
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline int cxe_redirect_port(u32 slot, u16 port) {
    struct cxe_port_key k = {.slot = slot, .port = port};
    return cxe_ports.lookup(&k) != NULL;
}

// Is something listening on gateway_ip:transparent_port in this namespace? Looked up with an empty peer so
// only a listener (never a leftover connection) can match.
static __always_inline int cxe_listener_up(struct __sk_buff *skb, const struct cxe_sandbox *cfg) {
    struct bpf_sock_tuple t = {};
    t.ipv4.daddr = cfg->gateway_ip;
    t.ipv4.dport = CXE_HTONS(cfg->transparent_port);
    struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    bpf_sk_release(sk);
    return 1;
}

struct cxe_arp {
    u16 htype, ptype;
    u8 hlen, plen;
    u16 op;
    u8 sha[6];
    u8 spa[4];
    u8 tha[6];
    u8 tpa[4];
} __attribute__((packed));

static __always_inline u32 cxe_classify(struct __sk_buff *skb, const struct cxe_sandbox *cfg, struct cxe_pkt *p) {
    struct cxe_eth eth;
    if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
        return CXE_UNPARSED;
    __builtin_memcpy(p->smac, eth.src, 6);
    u16 ethertype = CXE_NTOHS(eth.proto);
    p->ethertype = ethertype;

    if (!cxe_mac_eq(eth.src, cfg->mac))
        return CXE_SPOOF_MAC;
    // The stack strips an outer 802.1Q/802.1ad tag into skb metadata before tc runs; a second tag stays inline.
    if (skb->vlan_present || ethertype == CXE_ETH_P_8021Q || ethertype == CXE_ETH_P_8021AD)
        return CXE_VLAN;

    if (ethertype == CXE_ETH_P_ARP) {
        struct cxe_arp arp;
        if (bpf_skb_load_bytes(skb, sizeof(eth), &arp, sizeof(arp)) < 0)
            return CXE_UNPARSED;
        u32 spa, tpa;
        __builtin_memcpy(&spa, arp.spa, 4);
        __builtin_memcpy(&tpa, arp.tpa, 4);
        p->saddr = spa;
        p->daddr = tpa;
        p->family = 4;
        if (arp.htype != CXE_HTONS(1) || arp.ptype != CXE_HTONS(CXE_ETH_P_IP) || arp.hlen != 6 || arp.plen != 4 ||
            (arp.op != CXE_HTONS(1) && arp.op != CXE_HTONS(2)))
            return CXE_ARP_OTHER;
        // The sender must be the sandbox itself (a gratuitous ARP for the gateway's address fails here).
        if (!cxe_mac_eq(arp.sha, cfg->mac) || spa != cfg->sandbox_ip)
            return CXE_ARP_SPOOF;
        if (tpa != cfg->gateway_ip)
            return CXE_ARP_OTHER;
        return CXE_PASS_ARP;
    }
    if (ethertype == CXE_ETH_P_IPV6) {
        struct cxe_ip6 ip6;
        p->family = 6;
        if (bpf_skb_load_bytes(skb, sizeof(eth), &ip6, sizeof(ip6)) == 0) {
            p->daddr6[0] = ip6.daddr[0];
            p->daddr6[1] = ip6.daddr[1];
            p->daddr6[2] = ip6.daddr[2];
            p->daddr6[3] = ip6.daddr[3];
            p->proto = ip6.nexthdr;
        }
        return CXE_IPV6;
    }
    if (ethertype != CXE_ETH_P_IP)
        return CXE_ETHERTYPE;

    struct cxe_ip ip;
    if (bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
        return CXE_UNPARSED;
    p->family = 4;
    p->saddr = ip.saddr;
    p->daddr = ip.daddr;
    p->proto = ip.protocol;
    u32 ihl = ip.ver_ihl & 0x0F;
    if ((ip.ver_ihl >> 4) != 4 || ihl < 5)
        return CXE_UNPARSED;
    if (ip.saddr != cfg->sandbox_ip)
        return CXE_SPOOF_IP;
    if (ip.frag_off & CXE_HTONS(CXE_IP_MF | CXE_IP_OFFSET))
        return CXE_FRAGMENT;

    u32 l4 = sizeof(eth) + ihl * 4;
    int to_gateway = ip.daddr == cfg->gateway_ip;

    if (ip.protocol == CXE_IPPROTO_TCP) {
        struct cxe_tcp tcp;
        if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) < 0)
            return CXE_UNPARSED;
        u16 dport = CXE_NTOHS(tcp.dest);
        p->sport = CXE_NTOHS(tcp.source);
        p->dport = dport;
        if (to_gateway && dport != 0 &&
            (dport == cfg->proxy_port || dport == cfg->transparent_port || dport == cfg->dns_port))
            return CXE_PASS_GATEWAY;
        if (cxe_redirect_port(cfg->slot, dport)) {
            // Must end at the transparent listener: a new connection is dropped here while nothing listens;
            // otherwise the mark makes the nft redirect take it, and nft's forward rule drops it if not.
            if ((tcp.flags & (CXE_TCP_SYN | CXE_TCP_ACK)) == CXE_TCP_SYN && !cxe_listener_up(skb, cfg))
                return CXE_GATEWAY_DOWN;
            skb->mark = CXE_MARK;
            return CXE_PASS_REDIRECT;
        }
        return CXE_TCP_PORT;
    }
    if (ip.protocol == CXE_IPPROTO_UDP) {
        struct cxe_l4 udp;
        if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
            return CXE_UNPARSED;
        u16 dport = CXE_NTOHS(udp.dest);
        p->sport = CXE_NTOHS(udp.source);
        p->dport = dport;
        if (to_gateway && dport != 0 && dport == cfg->dns_port)
            return CXE_PASS_DNS;
        if (dport == 53)
            return CXE_DNS_OTHER;
        if (dport == 443)
            return CXE_QUIC;
        return CXE_UDP;
    }
    if (ip.protocol == CXE_IPPROTO_ICMP) {
        u8 type;
        if (bpf_skb_load_bytes(skb, l4, &type, 1) < 0)
            return CXE_UNPARSED;
        p->dport = type;
        if (to_gateway && (type == CXE_ICMP_ECHO || type == CXE_ICMP_ECHOREPLY || type == CXE_ICMP_DEST_UNREACH ||
                           type == CXE_ICMP_TIME_EXCEEDED))
            return CXE_PASS_ICMP;
        return CXE_ICMP;
    }
    return CXE_IP_PROTO;
}

int cxe_tc_guard(struct __sk_buff *skb) {
    struct cxe_pkt p = {};
    u32 ifindex = skb->ifindex;
    p.ifindex = ifindex;
    struct cxe_sandbox *cfg = cxe_ifaces.lookup(&ifindex);
    u32 slot = 0;
    u32 code = CXE_NO_CONFIG;
    if (cfg) {
        slot = cfg->slot;
        code = cxe_classify(skb, cfg, &p);
    }
    cxe_count(slot, code);
    if (code < CXE_FIRST_DROP)
        return TC_ACT_OK;
    cxe_tc_report(cfg, slot, code, &p);
    return TC_ACT_SHOT;
}

// ----------------------------------------------------------------------------------------------------------
// cgroup hooks for process sandboxes: connect() and unconnected sendmsg() of every process in the sandbox's
// cgroup (and its descendants). Return 1 to let the call proceed, 0 to refuse it (EPERM).

static __always_inline struct cxe_sandbox *cxe_cg_config(u64 *cgid) {
    struct cxe_sandbox *found = NULL;
    u64 id = bpf_get_current_cgroup_id();
    *cgid = id;
    found = cxe_cgroups.lookup(&id);
    if (found)
        return found;
    // The program runs for descendants too: the nearest configured ancestor wins.
    for (int level = CXE_MAX_CG_DEPTH; level >= 1; level--) {
        u64 anc = bpf_get_current_ancestor_cgroup_id(level);
        if (anc == 0)
            continue;
        struct cxe_sandbox *c = cxe_cgroups.lookup(&anc);
        if (c)
            return c;
    }
    return NULL;
}

static __always_inline int cxe_cg_report(struct cxe_sandbox *cfg, u64 cgid, u32 code, u8 hook, u8 proto,
                                         u8 family, u32 daddr, const u32 *daddr6, u16 dport) {
    u32 slot = cfg ? cfg->slot : 0;
    cxe_count(slot, code);
    if (code < CXE_FIRST_DROP)
        return 1;
    if (cxe_rate_ok(slot, code)) {
        struct cxe_event *ev = cxe_events.ringbuf_reserve(sizeof(struct cxe_event));
        if (ev) {
            __builtin_memset(ev, 0, sizeof(*ev));
            ev->ts_ns = bpf_ktime_get_ns();
            ev->cgroup_id = cgid;
            ev->slot = slot;
            ev->code = code;
            ev->daddr = daddr;
            if (family == 6) {
                ev->daddr6[0] = daddr6[0];
                ev->daddr6[1] = daddr6[1];
                ev->daddr6[2] = daddr6[2];
                ev->daddr6[3] = daddr6[3];
            }
            ev->dport = dport;
            ev->proto = proto;
            ev->family = family;
            ev->hook = hook;
            cxe_copy_id(ev->id, cfg);
            cxe_events.ringbuf_submit(ev, 0);
        }
    }
    return 0;
}

static __always_inline u32 cxe_cg_decide(struct cxe_sandbox *cfg, u8 proto, u32 daddr, u16 dport, int connect) {
    if (daddr == cfg->gateway_ip && dport != 0) {
        if (proto == CXE_IPPROTO_TCP && (dport == cfg->proxy_port || dport == cfg->transparent_port || dport == cfg->dns_port))
            return CXE_PASS_GATEWAY;
        if (proto == CXE_IPPROTO_UDP && dport == cfg->dns_port)
            return CXE_PASS_DNS;
    }
    if (proto == CXE_IPPROTO_TCP) {
        if (connect && cfg->transparent_port != 0 && cxe_redirect_port(cfg->slot, dport))
            return CXE_PASS_REDIRECT;
        return CXE_TCP_PORT;
    }
    if (proto == CXE_IPPROTO_UDP)
        return dport == 53 ? CXE_DNS_OTHER : (dport == 443 ? CXE_QUIC : CXE_UDP);
    return CXE_IP_PROTO;
}

static __always_inline void cxe_remember(struct bpf_sock_addr *ctx, struct cxe_sandbox *cfg, u32 daddr, u16 dport) {
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct cxe_orig o = {.daddr = daddr, .dport = dport, .slot = cfg->slot, .cookie = cookie};
    cxe_origdst.update(&cookie, &o);
}

static __always_inline int cxe_sock4(struct bpf_sock_addr *ctx, int connect, u8 hook) {
    u64 cgid = 0;
    struct cxe_sandbox *cfg = cxe_cg_config(&cgid);
    u8 proto = ctx->protocol;
    u32 daddr = ctx->user_ip4;
    u16 dport = CXE_NTOHS(ctx->user_port);
    u32 code = CXE_NO_CONFIG;
    if (cfg) {
        code = cxe_cg_decide(cfg, proto, daddr, dport, connect);
        if (code == CXE_PASS_REDIRECT) {
            cxe_remember(ctx, cfg, daddr, dport);
            ctx->user_ip4 = cfg->gateway_ip;
            ctx->user_port = CXE_HTONS(cfg->transparent_port);
        }
    }
    u32 none[4] = {};
    return cxe_cg_report(cfg, cgid, code, hook, proto, 4, daddr, none, dport);
}

int cxe_connect4(struct bpf_sock_addr *ctx) { return cxe_sock4(ctx, 1, CXE_HOOK_CONNECT4); }
int cxe_sendmsg4(struct bpf_sock_addr *ctx) { return cxe_sock4(ctx, 0, CXE_HOOK_SENDMSG4); }

// IPv6 sockets: only IPv4-mapped destinations (::ffff:a.b.c.d, dual-stack sockets) get the IPv4 rules; real
// IPv6 is refused.
static __always_inline int cxe_sock6(struct bpf_sock_addr *ctx, int connect, u8 hook) {
    u64 cgid = 0;
    struct cxe_sandbox *cfg = cxe_cg_config(&cgid);
    u8 proto = ctx->protocol;
    u32 a[4];
    a[0] = ctx->user_ip6[0];
    a[1] = ctx->user_ip6[1];
    a[2] = ctx->user_ip6[2];
    a[3] = ctx->user_ip6[3];
    u16 dport = CXE_NTOHS(ctx->user_port);
    int mapped = a[0] == 0 && a[1] == 0 && a[2] == CXE_HTONL_FFFF;
    u32 code = CXE_NO_CONFIG;
    if (cfg && !mapped) {
        code = CXE_IPV6;
    } else if (cfg) {
        code = cxe_cg_decide(cfg, proto, a[3], dport, connect);
        if (code == CXE_PASS_REDIRECT) {
            cxe_remember(ctx, cfg, a[3], dport);
            ctx->user_ip6[3] = cfg->gateway_ip;
            ctx->user_port = CXE_HTONS(cfg->transparent_port);
        }
    }
    u8 family = mapped ? 4 : 6;
    u32 daddr = mapped ? a[3] : 0;
    return cxe_cg_report(cfg, cgid, code, hook, proto, family, daddr, a, dport);
}

int cxe_connect6(struct bpf_sock_addr *ctx) { return cxe_sock6(ctx, 1, CXE_HOOK_CONNECT6); }
int cxe_sendmsg6(struct bpf_sock_addr *ctx) { return cxe_sock6(ctx, 0, CXE_HOOK_SENDMSG6); }

// sock_ops: once a redirected connection has its source port, index the original destination by the client's
// address too, so the gateway can find it from the peer address of the connection it accepted.
int cxe_sockops(struct bpf_sock_ops *skops) {
    u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        u64 cookie = bpf_get_socket_cookie(skops);
        struct cxe_orig *o = cxe_origdst.lookup(&cookie);
        if (o) {
            struct cxe_orig copy = *o;
            struct cxe_peer_key k = {.addr = skops->local_ip4, .port = (u16)skops->local_port};
            cxe_origpeer.update(&k, &copy);
            bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        }
    } else if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
        u64 cookie = bpf_get_socket_cookie(skops);
        cxe_origdst.delete(&cookie);
        struct cxe_peer_key k = {.addr = skops->local_ip4, .port = (u16)skops->local_port};
        cxe_origpeer.delete(&k);
    }
    return 1;
}
