// xdpturn-blast: UDP / ChannelData load generator and sink for the xdpturn benchmarks.
//
//   send  --to A:P [--from A:P | --fd N] [--channel N] --size B --rate PPS|max --duration S
//         [--count N] [--batch N (64; 1024 with --gso)] [--gso] [--sockbuf B]
//   recv  --on A:P | --fd N  [--channel-data | --channel N] --duration S [--idle-timeout S]
//         [--count N] [--batch N (256)] [--sockbuf B]
//   echo  --on A:P | --fd N  [--duration S] [--count N] [--batch N] [--sockbuf B]
//   ping  --to A:P [--from A:P | --fd N] [--channel N] --rate PPS --count N --size B
//         [--timeout S] [--duration S]
//   junk  --to A:P [--from A:P] --rate PPS|max --duration S [--count N] [--batch N] [--sockbuf B]
//
// junk sends what an attacker would throw at a TURN port (random bytes; truncated and bit-flipped
// STUN requests; ChannelData with random channel numbers and lying lengths; one 65,000-byte
// datagram in 256), cycling through a pool made once from a fixed seed, so runs are comparable
// and the sender's cost per datagram is the syscall's. Its result is that of send.
// Every payload starts with a big-endian u64 sequence number (0, 1, 2, ...) and a big-endian u64
// CLOCK_MONOTONIC timestamp in ns. CLOCK_MONOTONIC is one clock for the whole machine (network
// namespaces included), so recv can compute one-way latency when the sender runs on the same host.
// With --channel the payload is wrapped in a ChannelData message (RFC 8656 12.4; no padding over
// UDP). IPv6 addresses are written in brackets: [::1]:9000.
//
// Output, on stdout, one JSON object per line: {"type":"ready",...} once the socket is set up (so a
// caller can wait for a receiver without sleeping), then {"type":"result",...} at the end, also after
// SIGINT/SIGTERM. Errors go to stderr with exit status 2 (usage) or 1 (run time).
//
// --fd N uses an inherited, already bound UDP socket (e.g. the one a TURN client allocated from)
// without changing its flags: O_NONBLOCK and connect() would leak into the parent's socket, which
// shares the open file description. Only --sockbuf changes its buffer sizes, if asked for, and recv
// turns on SO_RXQ_OVFL, which only adds control data that a plain recvfrom() never sees.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HDR_LEN 16         // sequence number + timestamp
#define CD_HDR_LEN 4       // ChannelData: channel number + length
#define MAX_PAYLOAD 65503  // 65507 (largest UDP/IPv4 payload) minus the ChannelData header
#define MAX_BATCH 1024     // the kernel's UIO_MAXIOV limit for sendmmsg/recvmmsg
#define RECV_SLOT 64       // recv only reads headers; MSG_TRUNC still reports the full length
#define ECHO_SLOT 65536
#define GSO_MAX_SEGS 64   // UDP_MAX_SEGMENTS of older kernels
#define GSO_MAX_BYTES 65000  // a super-datagram must fit one IP packet
#define SEQ_CAP (1ULL << 34)  // bitmap of at most 2 GiB; later sequence numbers are "out of range"
#define NS 1000000000ULL

static volatile sig_atomic_t stop_requested;
static const char *cmd_name = "blast";

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "xdpturn-blast %s: ", cmd_name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void usage(const char *msg) __attribute__((noreturn));
static void usage(const char *msg) {
    fprintf(stderr,
            "xdpturn-blast %s: %s\n"
            "usage:\n"
            "  send --to A:P [--from A:P|--fd N] [--channel N] --size B --rate PPS|max "
            "--duration S [--count N] [--batch N] [--gso] [--sockbuf B]\n"
            "  recv --on A:P|--fd N [--channel-data|--channel N] --duration S "
            "[--idle-timeout S] [--count N] [--batch N] [--sockbuf B]\n"
            "  echo --on A:P|--fd N [--duration S] [--count N] [--batch N] [--sockbuf B]\n"
            "  ping --to A:P [--from A:P|--fd N] [--channel N] --rate PPS --count N --size B "
            "[--timeout S] [--duration S]\n"
            "  junk --to A:P [--from A:P] --rate PPS|max --duration S [--count N] [--batch N] "
            "[--sockbuf B]\n",
            cmd_name, msg);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static struct timespec to_timespec(uint64_t ns) {
    struct timespec ts = {.tv_sec = (time_t)(ns / NS), .tv_nsec = (long)(ns % NS)};
    return ts;
}

// ---------------------------------------------------------------------------------------------
// Options

enum {
    O_TO = 1 << 0, O_FROM = 1 << 1, O_ON = 1 << 2, O_FD = 1 << 3, O_CHANNEL = 1 << 4,
    O_CHANNEL_DATA = 1 << 5, O_SIZE = 1 << 6, O_RATE = 1 << 7, O_DURATION = 1 << 8,
    O_COUNT = 1 << 9, O_BATCH = 1 << 10, O_IDLE = 1 << 11, O_TIMEOUT = 1 << 12, O_SOCKBUF = 1 << 13,
    O_GSO = 1 << 14,
};

struct addr {
    struct sockaddr_storage ss;
    socklen_t len;
};

struct opts {
    unsigned seen;
    struct addr to, from, on;
    int fd;
    unsigned channel;      // 0: none
    bool channel_data;
    size_t size;
    double rate;           // packets per second; 0: as fast as possible
    uint64_t duration_ns;
    uint64_t count;        // 0: unbounded (duration still bounds)
    unsigned batch;
    uint64_t idle_ns;      // 0: none
    uint64_t timeout_ns;
    int sockbuf;           // 0: default
    bool gso;
};

static void parse_addr(const char *s, struct addr *a) {
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    const char *port;
    size_t hlen;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':') usage("IPv6 address must look like [::1]:9000");
        hlen = (size_t)(close - s - 1);
        s++;
        port = close + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) usage("address must look like 127.0.0.1:9000 or [::1]:9000");
        hlen = (size_t)(colon - s);
        if (memchr(s, ':', hlen)) usage("IPv6 address must be in brackets: [::1]:9000");
        port = colon + 1;
    }
    if (hlen == 0 || hlen >= sizeof(host)) usage("bad address");
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV, .ai_socktype = SOCK_DGRAM};
    struct addrinfo *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) usage(gai_strerror(rc));
    memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
    a->len = res->ai_addrlen;
    freeaddrinfo(res);
}

static double parse_double(const char *s, const char *what) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !(v >= 0) || !isfinite(v)) usage(what);
    return v;
}

static uint64_t parse_u64(const char *s, const char *what) {
    char *end;
    errno = 0;
    if (*s == '-') usage(what);
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || end == s) usage(what);
    return v;
}

static uint64_t seconds_to_ns(double s) {
    if (s > 1e9) usage("time out of range");
    return (uint64_t)(s * 1e9);
}

static void parse_opts(int argc, char **argv, unsigned allowed, struct opts *o) {
    static const struct option longopts[] = {
        {"to", required_argument, NULL, 't'},      {"from", required_argument, NULL, 'f'},
        {"on", required_argument, NULL, 'o'},      {"fd", required_argument, NULL, 'F'},
        {"channel", required_argument, NULL, 'c'}, {"channel-data", no_argument, NULL, 'C'},
        {"size", required_argument, NULL, 's'},    {"rate", required_argument, NULL, 'r'},
        {"duration", required_argument, NULL, 'd'}, {"count", required_argument, NULL, 'n'},
        {"batch", required_argument, NULL, 'b'},   {"idle-timeout", required_argument, NULL, 'i'},
        {"timeout", required_argument, NULL, 'T'}, {"sockbuf", required_argument, NULL, 'B'},
        {"gso", no_argument, NULL, 'G'},           {NULL, 0, NULL, 0},
    };
    memset(o, 0, sizeof(*o));
    o->fd = -1;
    o->batch = 64;
    o->timeout_ns = NS;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        unsigned bit;
        uint64_t v;
        switch (c) {
        case 't': bit = O_TO; parse_addr(optarg, &o->to); break;
        case 'f': bit = O_FROM; parse_addr(optarg, &o->from); break;
        case 'o': bit = O_ON; parse_addr(optarg, &o->on); break;
        case 'F':
            bit = O_FD;
            v = parse_u64(optarg, "--fd must be a descriptor number");
            if (v > 65535) usage("--fd out of range");
            o->fd = (int)v;
            break;
        case 'c':
            bit = O_CHANNEL;
            v = parse_u64(optarg, "--channel must be a number");
            if (v < 0x4000 || v > 0x4FFF) usage("--channel must be in 0x4000-0x4FFF (RFC 8656)");
            o->channel = (unsigned)v;
            break;
        case 'C': bit = O_CHANNEL_DATA; o->channel_data = true; break;
        case 'G': bit = O_GSO; o->gso = true; break;
        case 's':
            bit = O_SIZE;
            v = parse_u64(optarg, "--size must be a number");
            if (v < HDR_LEN || v > MAX_PAYLOAD) usage("--size must be in 16-65503");
            o->size = (size_t)v;
            break;
        case 'r':
            bit = O_RATE;
            o->rate = strcmp(optarg, "max") == 0 ? 0 : parse_double(optarg, "--rate must be PPS or max");
            if (strcmp(optarg, "max") != 0 && o->rate < 1) usage("--rate must be >= 1 or max");
            break;
        case 'd': bit = O_DURATION; o->duration_ns = seconds_to_ns(parse_double(optarg, "bad --duration")); break;
        case 'n': bit = O_COUNT; o->count = parse_u64(optarg, "--count must be a number"); break;
        case 'b':
            bit = O_BATCH;
            v = parse_u64(optarg, "--batch must be a number");
            if (v < 1 || v > MAX_BATCH) usage("--batch must be in 1-1024");
            o->batch = (unsigned)v;
            break;
        case 'i': bit = O_IDLE; o->idle_ns = seconds_to_ns(parse_double(optarg, "bad --idle-timeout")); break;
        case 'T': bit = O_TIMEOUT; o->timeout_ns = seconds_to_ns(parse_double(optarg, "bad --timeout")); break;
        case 'B':
            bit = O_SOCKBUF;
            v = parse_u64(optarg, "--sockbuf must be a number");
            if (v < 4096 || v > (1U << 30)) usage("--sockbuf must be in 4096-1073741824");
            o->sockbuf = (int)v;
            break;
        default: usage("unknown option");
        }
        if (!(allowed & bit)) usage("option not valid for this subcommand");
        o->seen |= bit;
    }
    if (optind != argc) usage("unexpected argument");
    if ((o->seen & O_FROM) && (o->seen & O_FD)) usage("--from and --fd exclude each other");
    if ((o->seen & O_ON) && (o->seen & O_FD)) usage("--on and --fd exclude each other");
    if (o->seen & O_CHANNEL) o->channel_data = true;
}

static void require(const struct opts *o, unsigned bits, const char *msg) {
    if ((o->seen & bits) == 0) usage(msg);
}

// ---------------------------------------------------------------------------------------------
// Sockets

static void format_addr(const struct sockaddr_storage *ss, socklen_t len, char *out, size_t n) {
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    if (getnameinfo((const struct sockaddr *)ss, len, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        snprintf(out, n, "?");
        return;
    }
    snprintf(out, n, ss->ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
}

static unsigned addr_port(const struct sockaddr_storage *ss) {
    if (ss->ss_family == AF_INET6) return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

// An IPv4 destination for an inherited dual-stack IPv6 socket becomes ::ffff:a.b.c.d.
static void match_family(struct addr *dst, int family) {
    if (dst->ss.ss_family == family) return;
    if (family == AF_INET6 && dst->ss.ss_family == AF_INET) {
        struct sockaddr_in v4 = *(struct sockaddr_in *)&dst->ss;
        struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = v4.sin_port};
        v6.sin6_addr.s6_addr[10] = 0xff;
        v6.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&v6.sin6_addr.s6_addr[12], &v4.sin_addr, 4);
        memset(&dst->ss, 0, sizeof(dst->ss));
        memcpy(&dst->ss, &v6, sizeof(v6));
        dst->len = sizeof(v6);
        return;
    }
    die("destination address family does not match the socket's");
}

static void set_bufs(int fd, int bytes) {
    // SO_*BUFFORCE passes net.core.[rw]mem_max when root; the plain option is the fallback.
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof(bytes)) != 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof(bytes)) != 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
}

struct sock {
    int fd;
    bool inherited;
    bool connected;
    struct addr local;
    struct addr peer;  // destination (send, ping)
};

// Opens the socket of a subcommand: the inherited --fd, or a new one bound to `bind_to` (if any)
// and, when `dst` is given, connected to it (connected sockets skip a route lookup per packet, and
// ping then only hears its destination).
static struct sock open_sock(const struct opts *o, const struct addr *bind_to, const struct addr *dst) {
    struct sock s = {.fd = -1};
    if (o->fd >= 0) {
        int type = 0;
        socklen_t tl = sizeof(type);
        if (getsockopt(o->fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0)
            die("--fd %d is not a socket: %s", o->fd, strerror(errno));
        if (type != SOCK_DGRAM) die("--fd %d is not a UDP socket", o->fd);
        s.fd = o->fd;
        s.inherited = true;
        if (o->sockbuf) set_bufs(s.fd, o->sockbuf);
    } else {
        int family = bind_to ? bind_to->ss.ss_family : dst->ss.ss_family;
        if (dst && bind_to && dst->ss.ss_family != bind_to->ss.ss_family)
            die("--from and --to are of different address families");
        s.fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (s.fd < 0) die("socket: %s", strerror(errno));
        int one = 1;
        // SO_REUSEPORT lets --from share a port with a socket that also set it; a socket that did
        // not (a typical TURN client) must be passed with --fd instead.
        (void)setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind_to && (o->seen & O_FROM))
            (void)setsockopt(s.fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
        set_bufs(s.fd, o->sockbuf ? o->sockbuf : 4 << 20);
        if (bind_to && bind((s.fd), (const struct sockaddr *)&bind_to->ss, bind_to->len) != 0) {
            char a[128];
            format_addr(&bind_to->ss, bind_to->len, a, sizeof(a));
            die("bind %s: %s", a, strerror(errno));
        }
        if (dst) {
            if (connect(s.fd, (const struct sockaddr *)&dst->ss, dst->len) != 0)
                die("connect: %s", strerror(errno));
            s.connected = true;
        }
    }
    s.local.len = sizeof(s.local.ss);
    if (getsockname(s.fd, (struct sockaddr *)&s.local.ss, &s.local.len) != 0)
        die("getsockname: %s", strerror(errno));
    if (dst) {
        s.peer = *dst;
        match_family(&s.peer, s.local.ss.ss_family);
    }
    return s;
}

static void print_ready(const struct sock *s) {
    char local[128];
    format_addr(&s->local.ss, s->local.len, local, sizeof(local));
    printf("{\"type\":\"ready\",\"cmd\":\"%s\",\"local\":\"%s\",\"port\":%u,\"family\":%d}\n",
           cmd_name, local, addr_port(&s->local.ss), s->local.ss.ss_family == AF_INET6 ? 6 : 4);
    fflush(stdout);
}

// Waits until fd is readable (events=POLLIN) or writable, at most until `deadline`; false on
// timeout or signal.
static bool wait_fd(int fd, short events, uint64_t deadline) {
    uint64_t t = now_ns();
    if (t >= deadline) return false;
    struct pollfd p = {.fd = fd, .events = events};
    struct timespec ts = to_timespec(deadline - t);
    return ppoll(&p, 1, &ts, NULL) > 0;
}

// ---------------------------------------------------------------------------------------------
// Payloads

static void put_be16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v) {
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static uint64_t get_be64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

// Writes the ChannelData header (if any) of a datagram; returns the offset of the payload.
static size_t frame_header(uint8_t *p, unsigned channel, size_t size) {
    if (!channel) return 0;
    put_be16(p, channel);
    put_be16(p + 2, (unsigned)size);
    return CD_HDR_LEN;
}

// Finds the payload of a datagram: strips a ChannelData header when `channel_data` (strict) or, when
// `sniff`, if the first two bits say ChannelData (a payload starts with a small sequence number,
// whose first byte is 0). Returns NULL for a malformed datagram.
static const uint8_t *payload_of(const uint8_t *p, size_t len, size_t avail, bool channel_data,
                                 bool sniff, unsigned want_channel, size_t *plen) {
    if (channel_data || (sniff && len >= 1 && (p[0] & 0xC0) == 0x40)) {
        if (len < CD_HDR_LEN || (p[0] & 0xC0) != 0x40) return NULL;
        unsigned ch = (unsigned)p[0] << 8 | p[1];
        size_t l = (size_t)p[2] << 8 | p[3];
        if (l > len - CD_HDR_LEN) return NULL;
        if (want_channel && ch != want_channel) return NULL;
        p += CD_HDR_LEN;
        len = l;
        avail = avail > CD_HDR_LEN ? avail - CD_HDR_LEN : 0;
    }
    if (len < HDR_LEN || avail < HDR_LEN) return NULL;
    *plen = len;
    return p;
}

// ---------------------------------------------------------------------------------------------
// Latency histogram: log-linear, 128 sub-buckets per power of two (< 0.8% error), fixed memory.

#define SUB 128
#define NBUCKETS (SUB * 58)

struct hist {
    uint64_t n, sum, min, max;
    uint64_t b[NBUCKETS];
};

static unsigned bucket_of(uint64_t v) {
    if (v < SUB) return (unsigned)v;
    unsigned e = (unsigned)(63 - __builtin_clzll(v)) - 7;
    return (e + 1) * SUB + (unsigned)((v >> e) - SUB);
}

static uint64_t bucket_mid(unsigned i) {
    if (i < SUB) return i;
    unsigned e = i / SUB - 1;
    uint64_t lo = (uint64_t)(i % SUB + SUB) << e;
    return lo + ((1ULL << e) >> 1);
}

static void hist_add(struct hist *h, uint64_t v) {
    if (h->n == 0 || v < h->min) h->min = v;
    if (v > h->max) h->max = v;
    h->n++;
    h->sum += v;
    h->b[bucket_of(v)]++;
}

static double hist_quantile_us(const struct hist *h, double q) {
    uint64_t rank = (uint64_t)ceil(q * (double)h->n);
    if (rank < 1) rank = 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        acc += h->b[i];
        if (acc >= rank) {
            uint64_t v = bucket_mid(i);
            if (v < h->min) v = h->min;
            if (v > h->max) v = h->max;
            return (double)v / 1e3;
        }
    }
    return (double)h->max / 1e3;
}

static void print_hist(const char *key, const struct hist *h) {
    if (h->n == 0) {
        printf(",\"%s\":null", key);
        return;
    }
    printf(",\"%s\":{\"samples\":%llu,\"min\":%.3f,\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,"
           "\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f}",
           key, (unsigned long long)h->n, (double)h->min / 1e3, (double)h->sum / (double)h->n / 1e3,
           hist_quantile_us(h, 0.5), hist_quantile_us(h, 0.9), hist_quantile_us(h, 0.99),
           hist_quantile_us(h, 0.999), (double)h->max / 1e3);
}

// ---------------------------------------------------------------------------------------------
// Sequence tracking: one bit per sequence number, grown on demand.

struct seqs {
    uint8_t *bits;
    uint64_t cap;  // in bits
    uint64_t unique, duplicates, reordered, out_of_range, first, max;
};

// Returns false for a duplicate.
static bool seq_add(struct seqs *s, uint64_t seq) {
    if (seq >= SEQ_CAP) {
        s->out_of_range++;
        return false;
    }
    if (seq >= s->cap) {
        uint64_t cap = s->cap ? s->cap : 1 << 16;
        while (cap <= seq) cap *= 2;
        uint8_t *b = realloc(s->bits, cap / 8);
        if (!b) die("out of memory for %llu sequence numbers", (unsigned long long)cap);
        memset(b + s->cap / 8, 0, (cap - s->cap) / 8);
        s->bits = b;
        s->cap = cap;
    }
    uint8_t mask = (uint8_t)(1u << (seq % 8));
    if (s->bits[seq / 8] & mask) {
        s->duplicates++;
        return false;
    }
    s->bits[seq / 8] |= mask;
    if (s->unique == 0) {
        s->first = s->max = seq;
    } else if (seq < s->max) {
        s->reordered++;
    } else {
        s->max = seq;
    }
    if (seq < s->first) s->first = seq;
    s->unique++;
    return true;
}

static void print_seqs(const struct seqs *s) {
    // Loss seen by the receiver: gaps below the highest number; the sender's count also covers
    // losses after the last datagram that arrived.
    uint64_t lost = s->unique ? s->max + 1 - s->unique : 0;
    printf(",\"unique\":%llu,\"lost\":%llu,\"reordered\":%llu,\"duplicates\":%llu,"
           "\"out_of_range\":%llu",
           (unsigned long long)s->unique, (unsigned long long)lost,
           (unsigned long long)s->reordered, (unsigned long long)s->duplicates,
           (unsigned long long)s->out_of_range);
    if (s->unique)
        printf(",\"first_seq\":%llu,\"max_seq\":%llu", (unsigned long long)s->first,
               (unsigned long long)s->max);
    else
        printf(",\"first_seq\":null,\"max_seq\":null");
}

// ---------------------------------------------------------------------------------------------
// Batches of datagrams

struct batch {
    struct mmsghdr *m;
    struct iovec *iov;
    uint8_t *buf;
    struct sockaddr_storage *names;
    char (*ctrl)[CMSG_SPACE(sizeof(uint32_t))];
    size_t slot;
    unsigned n;
};

static void batch_init(struct batch *b, unsigned n, size_t slot, bool with_names, bool with_ctrl) {
    b->n = n;
    b->slot = slot;
    b->m = calloc(n, sizeof(*b->m));
    b->iov = calloc(n, sizeof(*b->iov));
    b->buf = calloc(n, slot);
    b->names = with_names ? calloc(n, sizeof(*b->names)) : NULL;
    b->ctrl = with_ctrl ? calloc(n, sizeof(*b->ctrl)) : NULL;
    if (!b->m || !b->iov || !b->buf || (with_names && !b->names) || (with_ctrl && !b->ctrl))
        die("out of memory");
    for (unsigned i = 0; i < n; i++) {
        b->iov[i].iov_base = b->buf + (size_t)i * slot;
        b->iov[i].iov_len = slot;
        b->m[i].msg_hdr.msg_iov = &b->iov[i];
        b->m[i].msg_hdr.msg_iovlen = 1;
    }
}

// Resets what recvmmsg overwrites.
static void batch_rearm(struct batch *b, unsigned n) {
    for (unsigned i = 0; i < n; i++) {
        b->iov[i].iov_len = b->slot;
        if (b->names) {
            b->m[i].msg_hdr.msg_name = &b->names[i];
            b->m[i].msg_hdr.msg_namelen = sizeof(b->names[i]);
        }
        if (b->ctrl) {
            b->m[i].msg_hdr.msg_control = b->ctrl[i];
            b->m[i].msg_hdr.msg_controllen = sizeof(b->ctrl[i]);
        }
    }
}

static void install_signals(void) {
    struct sigaction sa = {.sa_handler = on_signal};  // no SA_RESTART: blocking calls return EINTR
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    // Die with the parent (a benchmark that crashed must not leave a blaster running).
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    // Default timer slack is 50 us; pacing wants sleeps that end on time.
    prctl(PR_SET_TIMERSLACK, 1UL);
}

// Handles an error of sendmmsg/sendmsg; returns false if the error is fatal.
static bool send_error_transient(int fd, int err, uint64_t deadline) {
    switch (err) {
    case EINTR:
    case ECONNREFUSED:  // ICMP from an earlier datagram; reported once, the datagram was not sent
        return true;
    case EAGAIN:
    case ENOBUFS:  // queue full: wait a little for room instead of spinning
        (void)wait_fd(fd, POLLOUT, deadline < now_ns() + 1000000 ? deadline : now_ns() + 1000000);
        return true;
    default:
        return false;
    }
}

static void name_msgs(struct batch *b, const struct sock *s) {
    for (unsigned i = 0; i < b->n; i++) {
        b->m[i].msg_hdr.msg_name = s->connected ? NULL : (void *)&s->peer.ss;
        b->m[i].msg_hdr.msg_namelen = s->connected ? 0 : s->peer.len;
    }
}

// ---------------------------------------------------------------------------------------------
// send

// With --gso, each message of a sendmmsg is one UDP_SEGMENT super-datagram of up to GSO_MAX_SEGS
// datagrams laid out back to back: the stack is walked once per super-datagram and the datagrams
// are cut just before the device. Measured here: ~4x the plain rate (~3x with TX checksum offload
// off, where the kernel checksums each segment); the wire carries the same datagrams.
static unsigned gso_segments(const struct opts *o, size_t dlen) {
    if (!o->gso) return 1;
    size_t segs = GSO_MAX_BYTES / dlen;
    if (segs > GSO_MAX_SEGS) segs = GSO_MAX_SEGS;
    return segs < 1 ? 1 : (unsigned)segs;
}

static int cmd_send(int argc, char **argv) {
    struct opts o;
    parse_opts(argc, argv,
               O_TO | O_FROM | O_FD | O_CHANNEL | O_SIZE | O_RATE | O_DURATION | O_COUNT | O_BATCH |
                   O_GSO | O_SOCKBUF,
               &o);
    require(&o, O_TO, "--to is required");
    require(&o, O_SIZE, "--size is required");
    require(&o, O_RATE, "--rate is required");
    require(&o, O_DURATION, "--duration is required");
    if (o.gso && !(o.seen & O_BATCH)) o.batch = MAX_BATCH;  // a few super-datagrams per call
    struct sock s = open_sock(&o, (o.seen & O_FROM) ? &o.from : NULL, &o.to);
    if (s.inherited) s.connected = false;

    size_t dlen = o.size + (o.channel ? CD_HDR_LEN : 0);
    size_t off = o.channel ? CD_HDR_LEN : 0;
    unsigned segs = gso_segments(&o, dlen);
    // The datagrams of one call lie back to back in b.buf; message j covers datagrams
    // [j*segs, (j+1)*segs).
    struct batch b;
    batch_init(&b, o.batch, dlen, false, o.gso);
    name_msgs(&b, &s);
    for (unsigned i = 0; i < b.n; i++) frame_header(b.buf + (size_t)i * dlen, o.channel, o.size);
    if (o.gso) {
        for (unsigned j = 0; j < b.n; j++) {
            struct msghdr *h = &b.m[j].msg_hdr;
            h->msg_control = b.ctrl[j];
            h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t gso_size = (uint16_t)dlen;
            memcpy(CMSG_DATA(c), &gso_size, sizeof(gso_size));
        }
    }

    print_ready(&s);
    uint64_t limit = o.count ? o.count : UINT64_MAX;
    uint64_t sent = 0, errors = 0, calls = 0;
    uint64_t start = now_ns(), deadline = start + o.duration_ns, t = start;
    double per_ns = o.rate / 1e9;
    while (!stop_requested && sent < limit) {
        t = now_ns();
        if (t >= deadline) break;
        uint64_t n = o.batch;
        if (limit - sent < n) n = limit - sent;
        if (o.rate > 0) {
            uint64_t due = (uint64_t)((double)(t - start) * per_ns) + 1;  // packet 0 is due at start
            if (due <= sent) {
                uint64_t next = start + (uint64_t)ceil((double)sent / per_ns);
                struct timespec ts = to_timespec(next < deadline ? next : deadline);
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
            if (due - sent < n) n = due - sent;
        }
        for (unsigned i = 0; i < n; i++) {
            uint8_t *p = b.buf + (size_t)i * dlen + off;
            put_be64(p, sent + i);
            put_be64(p + 8, t);
        }
        unsigned msgs = (unsigned)((n + segs - 1) / segs);
        for (unsigned j = 0; j < msgs; j++) {
            uint64_t in_msg = n - (uint64_t)j * segs < segs ? n - (uint64_t)j * segs : segs;
            b.iov[j].iov_base = b.buf + (size_t)j * segs * dlen;
            b.iov[j].iov_len = in_msg * dlen;
        }
        int r = sendmmsg(s.fd, b.m, msgs, 0);
        calls++;
        if (r < 0) {
            errors++;
            if (!send_error_transient(s.fd, errno, deadline)) die("sendmmsg: %s", strerror(errno));
            continue;
        }
        for (int j = 0; j < r; j++) sent += b.iov[j].iov_len / dlen;
    }
    t = now_ns();
    double elapsed = (double)(t - start) / 1e9;
    char dst[128];
    format_addr(&s.peer.ss, s.peer.len, dst, sizeof(dst));
    printf("{\"type\":\"result\",\"cmd\":\"send\",\"to\":\"%s\",\"sent\":%llu,\"bytes\":%llu,"
           "\"datagram_bytes\":%zu,\"elapsed_s\":%.6f,\"pps\":%.1f,\"errors\":%llu,"
           "\"calls\":%llu,\"gso_segments\":%u,\"interrupted\":%s}\n",
           dst, (unsigned long long)sent, (unsigned long long)(sent * dlen), dlen, elapsed,
           elapsed > 0 ? (double)sent / elapsed : 0.0, (unsigned long long)errors,
           (unsigned long long)calls, segs, stop_requested ? "true" : "false");
    return 0;
}

// ---------------------------------------------------------------------------------------------
// recv

static uint32_t ovfl_of(const struct msghdr *h) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR((struct msghdr *)h, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL) {
            uint32_t v;
            memcpy(&v, CMSG_DATA(c), sizeof(v));
            return v;
        }
    }
    return 0;
}

static int cmd_recv(int argc, char **argv) {
    struct opts o;
    parse_opts(argc, argv,
               O_ON | O_FD | O_CHANNEL | O_CHANNEL_DATA | O_DURATION | O_IDLE | O_COUNT | O_BATCH |
                   O_SOCKBUF,
               &o);
    require(&o, O_ON | O_FD, "--on or --fd is required");
    require(&o, O_DURATION, "--duration is required");
    if (!(o.seen & O_BATCH)) o.batch = 256;  // measured: 64 drops datagrams at 1.5 M/s, 256 keeps up
    struct sock s = open_sock(&o, (o.seen & O_ON) ? &o.on : NULL, NULL);
    int one = 1;
    // The kernel then tags each datagram with the socket's drop count: losses in our own receive
    // buffer are told apart from losses on the path.
    (void)setsockopt(s.fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one));

    struct batch b;
    batch_init(&b, o.batch, RECV_SLOT, false, true);
    struct seqs sq = {0};
    static struct hist lat;
    uint64_t received = 0, bytes = 0, malformed = 0, future = 0;
    uint32_t drops_first = 0, drops_last = 0;
    uint64_t limit = o.count ? o.count : UINT64_MAX;

    print_ready(&s);
    uint64_t start = now_ns(), deadline = start + o.duration_ns, first_rx = 0, last_rx = 0;
    while (!stop_requested && received < limit) {
        unsigned want = o.batch;
        if (limit - received < want) want = (unsigned)(limit - received);
        batch_rearm(&b, want);
        int r = recvmmsg(s.fd, b.m, want, MSG_DONTWAIT | MSG_TRUNC, NULL);
        uint64_t t = now_ns();
        if (r > 0) {
            if (!first_rx) first_rx = t;
            last_rx = t;
            for (int i = 0; i < r; i++) {
                size_t len = b.m[i].msg_len, plen;
                uint32_t drops = ovfl_of(&b.m[i].msg_hdr);
                if (received == 0) drops_first = drops;
                drops_last = drops;
                received++;
                bytes += len;
                const uint8_t *p = payload_of(b.iov[i].iov_base, len, RECV_SLOT, o.channel_data,
                                              false, o.channel, &plen);
                if (!p) {
                    malformed++;
                    continue;
                }
                if (!seq_add(&sq, get_be64(p))) continue;
                uint64_t ts = get_be64(p + 8);
                if (ts <= t)
                    hist_add(&lat, t - ts);
                else
                    future++;  // not our clock: the sender runs elsewhere
            }
            if (t >= deadline) break;
            continue;
        }
        if (r < 0 && errno != EAGAIN && errno != EINTR && errno != ECONNREFUSED)
            die("recvmmsg: %s", strerror(errno));
        uint64_t until = deadline;
        if (o.idle_ns && last_rx && last_rx + o.idle_ns < until) until = last_rx + o.idle_ns;
        if (t >= until) break;
        (void)wait_fd(s.fd, POLLIN, until);
    }
    uint64_t end = now_ns();
    double active = last_rx > first_rx ? (double)(last_rx - first_rx) / 1e9 : 0.0;
    printf("{\"type\":\"result\",\"cmd\":\"recv\",\"received\":%llu,\"bytes\":%llu,"
           "\"malformed\":%llu,\"socket_drops\":%u,\"elapsed_s\":%.6f,\"active_s\":%.6f,"
           "\"pps\":%.1f,\"future_timestamps\":%llu",
           (unsigned long long)received, (unsigned long long)bytes, (unsigned long long)malformed,
           drops_last - drops_first, (double)(end - start) / 1e9, active,
           active > 0 ? (double)(received - 1) / active : 0.0, (unsigned long long)future);
    print_seqs(&sq);
    print_hist("latency_us", &lat);
    printf(",\"interrupted\":%s}\n", stop_requested ? "true" : "false");
    return 0;
}

// ---------------------------------------------------------------------------------------------
// echo

static int cmd_echo(int argc, char **argv) {
    struct opts o;
    parse_opts(argc, argv, O_ON | O_FD | O_DURATION | O_COUNT | O_BATCH | O_SOCKBUF, &o);
    require(&o, O_ON | O_FD, "--on or --fd is required");
    if (!(o.seen & O_DURATION)) o.duration_ns = 60 * NS;  // bounded even when not asked
    struct sock s = open_sock(&o, (o.seen & O_ON) ? &o.on : NULL, NULL);
    struct batch b;
    batch_init(&b, o.batch, ECHO_SLOT, true, false);
    uint64_t received = 0, echoed = 0, bytes = 0, dropped = 0, truncated = 0;
    uint64_t limit = o.count ? o.count : UINT64_MAX;

    print_ready(&s);
    uint64_t start = now_ns(), deadline = start + o.duration_ns;
    while (!stop_requested && received < limit) {
        unsigned want = o.batch;
        if (limit - received < want) want = (unsigned)(limit - received);
        batch_rearm(&b, want);
        int r = recvmmsg(s.fd, b.m, want, MSG_DONTWAIT, NULL);
        if (r <= 0) {
            if (r < 0 && errno != EAGAIN && errno != EINTR && errno != ECONNREFUSED)
                die("recvmmsg: %s", strerror(errno));
            if (!wait_fd(s.fd, POLLIN, deadline) && now_ns() >= deadline) break;
            continue;
        }
        received += (unsigned)r;
        for (int i = 0; i < r; i++) {
            if (b.m[i].msg_hdr.msg_flags & MSG_TRUNC) truncated++;
            b.iov[i].iov_len = b.m[i].msg_len;  // reflect exactly what arrived, to whoever sent it
            bytes += b.m[i].msg_len;
        }
        int done = 0;
        while (done < r) {
            int w = sendmmsg(s.fd, b.m + done, (unsigned)(r - done), MSG_DONTWAIT);
            if (w > 0) {
                done += w;
                echoed += (unsigned)w;
                continue;
            }
            if (w < 0 && errno == EINTR) continue;
            if (w < 0 && errno != EAGAIN && errno != ENOBUFS && errno != ECONNREFUSED &&
                errno != EHOSTUNREACH && errno != ENETUNREACH)
                die("sendmmsg: %s", strerror(errno));
            // A full queue or an unreachable sender: drop this one rather than stall the echo.
            dropped++;
            done++;
        }
        if (now_ns() >= deadline) break;
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    printf("{\"type\":\"result\",\"cmd\":\"echo\",\"received\":%llu,\"echoed\":%llu,\"bytes\":%llu,"
           "\"dropped\":%llu,\"truncated\":%llu,\"elapsed_s\":%.6f,\"interrupted\":%s}\n",
           (unsigned long long)received, (unsigned long long)echoed, (unsigned long long)bytes,
           (unsigned long long)dropped, (unsigned long long)truncated, elapsed,
           stop_requested ? "true" : "false");
    return 0;
}

// ---------------------------------------------------------------------------------------------
// ping

static bool same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    if (a->ss_family != b->ss_family) return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
}

static int cmd_ping(int argc, char **argv) {
    struct opts o;
    parse_opts(argc, argv,
               O_TO | O_FROM | O_FD | O_CHANNEL | O_RATE | O_COUNT | O_SIZE | O_TIMEOUT |
                   O_DURATION | O_SOCKBUF,
               &o);
    require(&o, O_TO, "--to is required");
    require(&o, O_RATE, "--rate is required");
    require(&o, O_COUNT, "--count is required");
    require(&o, O_SIZE, "--size is required");
    if (o.rate <= 0) usage("ping needs a fixed --rate");
    if (o.count < 1 || o.count > SEQ_CAP) usage("--count out of range");
    struct sock s = open_sock(&o, (o.seen & O_FROM) ? &o.from : NULL, &o.to);
    if (s.inherited) s.connected = false;

    size_t dlen = o.size + (o.channel ? CD_HDR_LEN : 0);
    uint8_t *out = calloc(1, dlen);
    if (!out) die("out of memory");
    size_t off = frame_header(out, o.channel, o.size);
    struct batch b;
    batch_init(&b, 64, ECHO_SLOT, true, false);
    struct seqs sq = {0};
    static struct hist rtt;
    uint64_t sent = 0, errors = 0, malformed = 0, foreign = 0;

    print_ready(&s);
    uint64_t start = now_ns(), interval = (uint64_t)(1e9 / o.rate);
    uint64_t send_end = o.duration_ns ? start + o.duration_ns : UINT64_MAX, next_send = start;
    uint64_t wait_end = 0;
    bool sending = true;
    while (!stop_requested) {
        // Drain replies first so their receive time is not delayed by our own sending.
        for (;;) {
            batch_rearm(&b, b.n);
            int r = recvmmsg(s.fd, b.m, b.n, MSG_DONTWAIT, NULL);
            if (r <= 0) {
                if (r < 0 && errno != EAGAIN && errno != EINTR && errno != ECONNREFUSED)
                    die("recvmmsg: %s", strerror(errno));
                break;
            }
            uint64_t t = now_ns();
            for (int i = 0; i < r; i++) {
                size_t plen;
                if (!s.connected && !same_addr(&b.names[i], &s.peer.ss)) {
                    foreign++;  // an inherited socket also hears others
                    continue;
                }
                const uint8_t *p = payload_of(b.iov[i].iov_base, b.m[i].msg_len, b.slot,
                                              false, true, 0, &plen);
                if (!p) {
                    malformed++;
                    continue;
                }
                uint64_t seq = get_be64(p), ts = get_be64(p + 8);
                if (seq >= sent || ts > t) {
                    malformed++;  // never sent by this run
                    continue;
                }
                if (seq_add(&sq, seq)) hist_add(&rtt, t - ts);
            }
        }
        uint64_t t = now_ns();
        if (sending && (sent >= o.count || t >= send_end)) {
            sending = false;
            wait_end = t + o.timeout_ns;
        }
        if (!sending && (sq.unique >= sent || t >= wait_end)) break;
        if (sending && t >= next_send) {
            put_be64(out + off, sent);
            put_be64(out + off + 8, now_ns());
            ssize_t w = s.connected ? send(s.fd, out, dlen, MSG_DONTWAIT)
                                    : sendto(s.fd, out, dlen, MSG_DONTWAIT,
                                             (const struct sockaddr *)&s.peer.ss, s.peer.len);
            if (w < 0) {
                errors++;
                if (errno != EINTR && errno != EAGAIN && errno != ENOBUFS && errno != ECONNREFUSED)
                    die("send: %s", strerror(errno));
            }
            // A datagram that failed to go out counts as sent and lost: the sequence stays simple.
            sent++;
            next_send += interval;
            continue;
        }
        (void)wait_fd(s.fd, POLLIN, sending ? next_send : wait_end);
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    printf("{\"type\":\"result\",\"cmd\":\"ping\",\"sent\":%llu,\"received\":%llu,\"lost\":%llu,"
           "\"duplicates\":%llu,\"reordered\":%llu,\"malformed\":%llu,\"foreign\":%llu,"
           "\"errors\":%llu,\"elapsed_s\":%.6f",
           (unsigned long long)sent, (unsigned long long)sq.unique,
           (unsigned long long)(sent - sq.unique), (unsigned long long)sq.duplicates,
           (unsigned long long)sq.reordered, (unsigned long long)malformed,
           (unsigned long long)foreign, (unsigned long long)errors, elapsed);
    print_hist("rtt_us", &rtt);
    printf(",\"interrupted\":%s}\n", stop_requested ? "true" : "false");
    return 0;
}

// ---------------------------------------------------------------------------------------------
// junk

#define JUNK_POOL 4096
#define JUNK_BIG 65000
#define JUNK_MAX_SMALL 1200
#define STUN_COOKIE 0x2112A442u

static uint64_t junk_state = 0x9E3779B97F4A7C15ULL;

static uint64_t junk_rand(void) {  // xorshift64*
    junk_state ^= junk_state >> 12;
    junk_state ^= junk_state << 25;
    junk_state ^= junk_state >> 27;
    return junk_state * 0x2545F4914F6CDD1DULL;
}

static void junk_random(uint8_t *p, size_t len) {
    for (size_t i = 0; i < len; i++) p[i] = (uint8_t)junk_rand();
}

// A well-formed STUN request: header and a few attributes (REQUESTED-TRANSPORT, USERNAME,
// SOFTWARE); returns its length. The method is Binding or Allocate.
static size_t junk_stun(uint8_t *p) {
    size_t len = 20;
    put_be16(p, junk_rand() & 1 ? 0x0001 : 0x0003);
    uint32_t cookie = htonl(STUN_COOKIE);
    memcpy(p + 4, &cookie, 4);
    junk_random(p + 8, 12);
    put_be16(p + len, 0x0019);  // REQUESTED-TRANSPORT: UDP
    put_be16(p + len + 2, 4);
    p[len + 4] = 17;
    p[len + 5] = p[len + 6] = p[len + 7] = 0;
    len += 8;
    size_t ulen = 4 + junk_rand() % 60;
    put_be16(p + len, 0x0006);  // USERNAME
    put_be16(p + len + 2, (unsigned)ulen);
    for (size_t i = 0; i < ulen; i++) p[len + 4 + i] = (uint8_t)('a' + junk_rand() % 26);
    size_t padded = (ulen + 3) & ~(size_t)3;
    memset(p + len + 4 + ulen, 0, padded - ulen);
    len += 4 + padded;
    put_be16(p + len, 0x8022);  // SOFTWARE
    put_be16(p + len + 2, 8);
    memcpy(p + len + 4, "junk/1.0", 8);
    len += 12;
    put_be16(p + 2, (unsigned)(len - 20));
    return len;
}

// One junk datagram at p (room for JUNK_BIG bytes); returns its length.
static size_t junk_make(uint8_t *p, unsigned i) {
    if (i % 256 == 255) {  // a datagram that the IP layer must fragment on most links
        junk_random(p, JUNK_BIG);
        return JUNK_BIG;
    }
    switch (i % 4) {
    case 0: {  // random bytes of a random length
        size_t len = 1 + junk_rand() % JUNK_MAX_SMALL;
        junk_random(p, len);
        return len;
    }
    case 1: {  // a STUN request cut short (the header's length field now lies)
        size_t len = junk_stun(p);
        return 1 + junk_rand() % (len - 1);
    }
    case 2: {  // a STUN request with 1-3 bits flipped anywhere, header included
        size_t len = junk_stun(p);
        unsigned flips = 1 + (unsigned)(junk_rand() % 3);
        for (unsigned f = 0; f < flips; f++) {
            size_t bit = junk_rand() % (len * 8);
            p[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        }
        return len;
    }
    default: {  // ChannelData, random channel in 0x4000-0x7FFF, a length that rarely tells the truth
        size_t payload = junk_rand() % JUNK_MAX_SMALL;
        put_be16(p, 0x4000 | (unsigned)(junk_rand() & 0x3FFF));
        put_be16(p + 2, (unsigned)(junk_rand() % 4 == 0 ? payload : junk_rand() & 0xFFFF));
        junk_random(p + 4, payload);
        return 4 + payload;
    }
    }
}

static int cmd_junk(int argc, char **argv) {
    struct opts o;
    parse_opts(argc, argv, O_TO | O_FROM | O_RATE | O_DURATION | O_COUNT | O_BATCH | O_SOCKBUF, &o);
    require(&o, O_TO, "--to is required");
    require(&o, O_RATE, "--rate is required");
    require(&o, O_DURATION, "--duration is required");
    struct sock s = open_sock(&o, (o.seen & O_FROM) ? &o.from : NULL, &o.to);

    // The pool: JUNK_POOL datagrams, the big ones sharing one buffer (their bytes do not matter).
    uint8_t *big = malloc(JUNK_BIG);
    uint8_t *small = malloc((size_t)JUNK_POOL * JUNK_MAX_SMALL);
    size_t *lens = calloc(JUNK_POOL, sizeof(*lens));
    uint8_t **bufs = calloc(JUNK_POOL, sizeof(*bufs));
    uint8_t *scratch = malloc(JUNK_BIG);
    if (!big || !small || !lens || !bufs || !scratch) die("out of memory");
    junk_random(big, JUNK_BIG);
    for (unsigned i = 0; i < JUNK_POOL; i++) {
        size_t len = junk_make(scratch, i);
        if (len == JUNK_BIG) {
            bufs[i] = big;
        } else {
            bufs[i] = small + (size_t)i * JUNK_MAX_SMALL;
            memcpy(bufs[i], scratch, len);
        }
        lens[i] = len;
    }
    free(scratch);

    struct batch b;
    batch_init(&b, o.batch, 1, false, false);
    name_msgs(&b, &s);

    print_ready(&s);
    uint64_t limit = o.count ? o.count : UINT64_MAX;
    uint64_t sent = 0, nbytes = 0, errors = 0, calls = 0;
    uint64_t start = now_ns(), deadline = start + o.duration_ns, t = start;
    double per_ns = o.rate / 1e9;
    while (!stop_requested && sent < limit) {
        t = now_ns();
        if (t >= deadline) break;
        uint64_t n = o.batch;
        if (limit - sent < n) n = limit - sent;
        if (o.rate > 0) {
            uint64_t due = (uint64_t)((double)(t - start) * per_ns) + 1;
            if (due <= sent) {
                uint64_t next = start + (uint64_t)ceil((double)sent / per_ns);
                struct timespec ts = to_timespec(next < deadline ? next : deadline);
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
            if (due - sent < n) n = due - sent;
        }
        for (unsigned j = 0; j < n; j++) {
            unsigned k = (unsigned)((sent + j) % JUNK_POOL);
            b.iov[j].iov_base = bufs[k];
            b.iov[j].iov_len = lens[k];
        }
        int r = sendmmsg(s.fd, b.m, (unsigned)n, 0);
        calls++;
        if (r < 0) {
            errors++;
            if (!send_error_transient(s.fd, errno, deadline)) die("sendmmsg: %s", strerror(errno));
            continue;
        }
        for (int j = 0; j < r; j++) nbytes += b.iov[j].iov_len;
        sent += (uint64_t)r;
    }
    t = now_ns();
    double elapsed = (double)(t - start) / 1e9;
    char dst[128];
    format_addr(&s.peer.ss, s.peer.len, dst, sizeof(dst));
    printf("{\"type\":\"result\",\"cmd\":\"junk\",\"to\":\"%s\",\"sent\":%llu,\"bytes\":%llu,"
           "\"datagram_bytes\":%llu,\"elapsed_s\":%.6f,\"pps\":%.1f,\"errors\":%llu,"
           "\"calls\":%llu,\"gso_segments\":1,\"interrupted\":%s}\n",
           dst, (unsigned long long)sent, (unsigned long long)nbytes,
           (unsigned long long)(sent ? nbytes / sent : 0), elapsed,
           elapsed > 0 ? (double)sent / elapsed : 0.0, (unsigned long long)errors,
           (unsigned long long)calls, stop_requested ? "true" : "false");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage("missing subcommand");
    cmd_name = argv[1];
    install_signals();
    // getopt_long then sees the subcommand as argv[0].
    if (strcmp(argv[1], "send") == 0) return cmd_send(argc - 1, argv + 1);
    if (strcmp(argv[1], "recv") == 0) return cmd_recv(argc - 1, argv + 1);
    if (strcmp(argv[1], "echo") == 0) return cmd_echo(argc - 1, argv + 1);
    if (strcmp(argv[1], "ping") == 0) return cmd_ping(argc - 1, argv + 1);
    if (strcmp(argv[1], "junk") == 0) return cmd_junk(argc - 1, argv + 1);
    usage("unknown subcommand");
}
