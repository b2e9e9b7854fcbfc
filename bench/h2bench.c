/* h2bench: a small compiled etcd v3 gRPC load generator (h2c, one thread, epoll).
 *
 * Modes (see usage()):
 *   watch  - W watchers over C connections x S streams; a writer puts to etcd and
 *            put-to-receive latency is computed per event (put send time per revision,
 *            receive time per watcher per revision); checks every watcher got every event in order.
 *   lease  - grants N leases, then C clients (one LeaseKeepAlive stream each) keep a window of
 *            keepalives in flight (closed loop); checks every keepalive is answered with its ID.
 *   unary  - closed-loop Put (distinct keys) or Range, C connections x M in flight.
 *   storm  - N short connections, P at a time, each doing one Range then closing.
 * Prints "READY ..." lines for the orchestrator, then one "RESULT {json}" line.
 * Protobuf fields are hand-encoded: only the few fields the benchmark needs. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---------- small utilities ---------- */
static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static void die(const char *m) {
  fprintf(stderr, "h2bench: %s\n", m);
  exit(2);
}
static void *xcalloc(size_t n, size_t s) {
  void *p = calloc(n ? n : 1, s ? s : 1);
  if (!p) die("out of memory");
  return p;
}
typedef struct {
  uint8_t *p;
  size_t off, len, cap;
} buf_t;
static void buf_append(buf_t *b, const void *d, size_t n) {
  if (b->off && b->off == b->len) b->off = b->len = 0;
  if (b->len + n > b->cap) {
    if (b->off) { /* compact first */
      memmove(b->p, b->p + b->off, b->len - b->off);
      b->len -= b->off;
      b->off = 0;
    }
    if (b->len + n > b->cap) {
      size_t c = b->cap ? b->cap : 4096;
      while (c < b->len + n) c *= 2;
      b->p = realloc(b->p, c);
      if (!b->p) die("out of memory");
      b->cap = c;
    }
  }
  memcpy(b->p + b->len, d, n);
  b->len += n;
}
static size_t buf_avail(const buf_t *b) { return b->len - b->off; }

/* errors: count them all, keep the first few messages */
static long g_nerrors;
static char g_errmsg[8][240];
static void err(const char *fmt, ...) {
  if (g_nerrors < 8) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_errmsg[g_nerrors], sizeof g_errmsg[0], fmt, ap);
    va_end(ap);
  }
  g_nerrors++;
}

/* latency samples (seconds) */
typedef struct {
  double *v;
  size_t n, cap;
} lat_t;
static void lat_add(lat_t *l, double x) {
  if (l->n == l->cap) {
    l->cap = l->cap ? l->cap * 2 : 1024;
    l->v = realloc(l->v, l->cap * sizeof(double));
    if (!l->v) die("out of memory");
  }
  l->v[l->n++] = x;
}
static int dcmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
static double pct(lat_t *l, double q) { /* l must be sorted */
  if (!l->n) return -1;
  size_t i = (size_t)(q * (double)(l->n - 1) + 0.5);
  return l->v[i];
}

/* ---------- protobuf ---------- */
static size_t pb_varint_raw(uint8_t *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (uint8_t)v;
  return n;
}
static size_t pb_varint(uint8_t *p, int field, uint64_t v) {
  size_t n = pb_varint_raw(p, (uint64_t)(field << 3));
  return n + pb_varint_raw(p + n, v);
}
static size_t pb_bytes(uint8_t *p, int field, const void *d, size_t len) {
  size_t n = pb_varint_raw(p, (uint64_t)(field << 3 | 2));
  n += pb_varint_raw(p + n, len);
  memcpy(p + n, d, len);
  return n + len;
}
typedef struct {
  int field, wt;
  uint64_t v;
  const uint8_t *d;
  size_t n;
} pbf;
static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  uint64_t r = 0;
  for (int s = 0; s < 64 && *p < end; s += 7) {
    uint8_t b = *(*p)++;
    r |= (uint64_t)(b & 0x7f) << s;
    if (!(b & 0x80)) {
      *v = r;
      return 0;
    }
  }
  return -1;
}
/* 1 = field read, 0 = end, -1 = malformed */
static int pb_next(const uint8_t **p, const uint8_t *end, pbf *f) {
  if (*p >= end) return 0;
  uint64_t tag;
  if (get_varint(p, end, &tag)) return -1;
  f->field = (int)(tag >> 3);
  f->wt = (int)(tag & 7);
  switch (f->wt) {
  case 0:
    return get_varint(p, end, &f->v) ? -1 : 1;
  case 1:
    if (end - *p < 8) return -1;
    *p += 8;
    return 1;
  case 5:
    if (end - *p < 4) return -1;
    *p += 4;
    return 1;
  case 2:
    if (get_varint(p, end, &f->v) || (uint64_t)(end - *p) < f->v) return -1;
    f->d = *p;
    f->n = (size_t)f->v;
    *p += f->n;
    return 1;
  default:
    return -1;
  }
}
/* header (field 1 of every response) -> revision (field 3) */
static int64_t pb_header_rev(const uint8_t *d, size_t n) {
  const uint8_t *p = d, *e = d + n;
  pbf f;
  while (pb_next(&p, e, &f) == 1)
    if (f.field == 1 && f.wt == 2) {
      const uint8_t *q = f.d, *qe = f.d + f.n;
      pbf g;
      while (pb_next(&q, qe, &g) == 1)
        if (g.field == 3 && g.wt == 0) return (int64_t)g.v;
    }
  return -1;
}

/* ---------- options ---------- */
static const char *o_mode = "";
static char o_host[64] = "127.0.0.1";
static int o_port, o_wport; /* target and writer (direct etcd) ports */
static int o_conns = 10, o_streams = 1, o_per_stream = 1, o_watchers = 100;
static int o_keys = 1;          /* watch: number of distinct keys */
static int o_puts = 1000;       /* watch: number of puts */
static double o_rate = 200;     /* watch: puts/s, 0 = as fast as possible */
static int o_inflight = 16;     /* writer/unary in-flight per connection */
static double o_duration = 5;   /* lease/unary seconds */
static double o_timeout = 60;   /* hard deadline for the whole run */
static double o_create = 60;    /* watch: deadline for creating every watcher */
static double o_drain = 60;     /* watch: max wait for stragglers after the last put */
static double o_idle = 3;       /* watch: ...but give up after this long without a new event */
static int o_leases = 1000, o_window = 10;
static int o_ttl = 10; /* lease TTL; the Go proxy answers repeat keepalives of a lease only every TTL/3 */
static int o_storm = 1000, o_parallel = 20;
static const char *o_prefix = "bench";
static const char *o_method = "put";
static int o_serializable = 1;
static char g_authority[80];

/* ---------- connections and streams ---------- */
enum { K_UNARY = 1, K_WATCH, K_LEASE };
typedef struct conn conn;
typedef struct strm strm;
typedef void (*done_cb)(strm *st, int ok);
struct strm {
  conn *c;
  int32_t id;
  int kind;
  buf_t out, in;
  int out_eof, deferred;
  int http_status, grpc_status;
  char grpc_msg[120];
  double t0;
  int idx;      /* owner's index */
  uint64_t tag; /* owner's extra data */
  done_cb done;
  int quiet; /* writer puts: failures are counted apart from correctness errors */
  const uint8_t *resp; /* unary: first message */
  size_t resp_n;
};
struct conn {
  int fd, idx, connected, want_out, dead, finished;
  nghttp2_session *s;
  buf_t w;
  double t0;
};
static int g_ep;
static int g_stopping; /* streams closing now is expected */
static nghttp2_session_callbacks *g_cbs;
static void (*g_msg_handler)(strm *st, const uint8_t *m, size_t n);
static long g_wfail;
static char g_wmsg[200];

static ssize_t data_read(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud) {
  (void)s, (void)id, (void)ud;
  strm *st = src->ptr;
  size_t avail = buf_avail(&st->out);
  if (!avail) {
    if (st->out_eof) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      return 0;
    }
    st->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  size_t n = avail < len ? avail : len;
  memcpy(buf, st->out.p + st->out.off, n);
  st->out.off += n;
  if (st->out_eof && !buf_avail(&st->out)) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}
static void strm_send(strm *st, const uint8_t *msg, size_t n, int last) {
  uint8_t pre[5] = {0, (uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n};
  buf_append(&st->out, pre, 5);
  buf_append(&st->out, msg, n);
  if (last) st->out_eof = 1;
  if (st->deferred && st->id > 0) {
    st->deferred = 0;
    nghttp2_session_resume_data(st->c->s, st->id);
  }
}
#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}
static strm *open_stream(conn *c, const char *path, int kind) {
  strm *st = xcalloc(1, sizeof *st);
  st->c = c;
  st->kind = kind;
  st->grpc_status = -1;
  st->t0 = now();
  nghttp2_nv h[] = {NV(":method", "POST"),   NV(":scheme", "http"),
                    NV(":path", path),       NV(":authority", g_authority),
                    NV("content-type", "application/grpc"), NV("te", "trailers")};
  nghttp2_data_provider dp;
  dp.source.ptr = st;
  dp.read_callback = data_read;
  int32_t id = nghttp2_submit_request(c->s, NULL, h, 6, &dp, st);
  if (id < 0) die("submit_request failed");
  st->id = id;
  return st;
}
/* unary: one request message, done(st, ok) when the stream closes */
static strm *unary(conn *c, const char *path, const uint8_t *msg, size_t n, done_cb done, int idx, uint64_t tag) {
  strm *st = open_stream(c, path, K_UNARY);
  st->done = done;
  st->idx = idx;
  st->tag = tag;
  strm_send(st, msg, n, 1);
  return st;
}

static int parse_int(const uint8_t *v, size_t n) {
  int r = 0;
  for (size_t i = 0; i < n && v[i] >= '0' && v[i] <= '9'; i++) r = r * 10 + (v[i] - '0');
  return r;
}
static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nl, const uint8_t *val,
                     size_t vl, uint8_t flags, void *ud) {
  (void)flags, (void)ud;
  strm *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (!st) return 0;
  if (nl == 7 && !memcmp(name, ":status", 7))
    st->http_status = parse_int(val, vl);
  else if (nl == 11 && !memcmp(name, "grpc-status", 11))
    st->grpc_status = parse_int(val, vl);
  else if (nl == 12 && !memcmp(name, "grpc-message", 12))
    snprintf(st->grpc_msg, sizeof st->grpc_msg, "%.*s", (int)vl, val);
  return 0;
}
static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *d, size_t n, void *ud) {
  (void)flags, (void)ud;
  strm *st = nghttp2_session_get_stream_user_data(s, id);
  if (!st) return 0;
  buf_append(&st->in, d, n);
  if (st->kind == K_UNARY) return 0; /* parsed when the stream closes */
  while (buf_avail(&st->in) >= 5) {
    const uint8_t *p = st->in.p + st->in.off;
    size_t len = (size_t)p[1] << 24 | (size_t)p[2] << 16 | (size_t)p[3] << 8 | p[4];
    if (buf_avail(&st->in) < 5 + len) break;
    st->in.off += 5 + len;
    g_msg_handler(st, p + 5, len);
  }
  return 0;
}
static int on_close(nghttp2_session *s, int32_t id, uint32_t code, void *ud) {
  (void)ud;
  strm *st = nghttp2_session_get_stream_user_data(s, id);
  if (!st) return 0;
  nghttp2_session_set_stream_user_data(s, id, NULL);
  if (st->kind == K_UNARY) {
    int ok = code == 0 && st->http_status == 200 && st->grpc_status == 0 && buf_avail(&st->in) >= 5;
    if (ok) {
      st->resp = st->in.p + st->in.off + 5;
      st->resp_n = buf_avail(&st->in) - 5;
    } else if (st->quiet) {
      if (!g_wfail++)
        snprintf(g_wmsg, sizeof g_wmsg, "http %d grpc-status %d (%s) h2 error %u", st->http_status, st->grpc_status,
                 st->grpc_msg, code);
    } else if (!g_stopping) {
      err("unary stream %d: http %d grpc-status %d (%s) h2 error %u", id, st->http_status, st->grpc_status,
          st->grpc_msg, code);
    }
    if (st->done) st->done(st, ok);
  } else if (!g_stopping) {
    err("%s stream closed early: http %d grpc-status %d (%s) h2 error %u", st->kind == K_WATCH ? "watch" : "lease",
        st->http_status, st->grpc_status, st->grpc_msg, code);
  }
  free(st->out.p);
  free(st->in.p);
  free(st);
  return 0;
}

static void conn_events(conn *c, int out) {
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(g_ep, EPOLL_CTL_MOD, c->fd, &ev);
  c->want_out = out;
}
static conn *conn_new(int port, int idx) {
  conn *c = xcalloc(1, sizeof *c);
  c->idx = idx;
  c->t0 = now();
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die("socket failed");
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, o_host, &a.sin_addr);
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
    err("connect: %s", strerror(errno));
    c->dead = 1;
  } else {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(g_ep, EPOLL_CTL_ADD, c->fd, &ev);
  }
  c->want_out = 1;
  nghttp2_session_client_new(&c->s, g_cbs, c);
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24},
                                 {NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
  nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
  nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 1 << 30);
  return c;
}
static void conn_kill(conn *c) {
  if (c->dead) return;
  c->dead = 1;
  epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
}
static void conn_free(conn *c) {
  if (!c->dead) epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  g_stopping++;
  nghttp2_session_del(c->s); /* closes remaining streams via on_close */
  g_stopping--;
  free(c->w.p);
  free(c);
}
static void conn_flush(conn *c) {
  if (c->dead) return;
  while (buf_avail(&c->w) < (1 << 20)) {
    const uint8_t *d;
    ssize_t n = nghttp2_session_mem_send(c->s, &d);
    if (n < 0) {
      err("nghttp2 send: %s", nghttp2_strerror((int)n));
      conn_kill(c);
      return;
    }
    if (!n) break;
    buf_append(&c->w, d, (size_t)n);
  }
  if (c->connected) {
    while (buf_avail(&c->w)) {
      ssize_t n = write(c->fd, c->w.p + c->w.off, buf_avail(&c->w));
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        if (!g_stopping) err("write: %s", strerror(errno));
        conn_kill(c);
        return;
      }
      c->w.off += (size_t)n;
    }
  }
  int out = !c->connected || buf_avail(&c->w) > 0;
  if (out != c->want_out) conn_events(c, out);
}
static void conn_on_event(conn *c, uint32_t evs) {
  if (c->dead) return;
  if (!c->connected && (evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    int e = 0;
    socklen_t l = sizeof e;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &l);
    if (e) {
      err("connect: %s", strerror(e));
      conn_kill(c);
      return;
    }
    c->connected = 1;
  }
  if (evs & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
    uint8_t b[65536];
    for (;;) {
      ssize_t n = read(c->fd, b, sizeof b);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        if (!g_stopping) err("read: %s", strerror(errno));
        conn_kill(c);
        return;
      }
      if (n == 0) {
        if (!g_stopping && !c->finished) err("connection closed by peer");
        conn_kill(c);
        return;
      }
      ssize_t r = nghttp2_session_mem_recv(c->s, b, (size_t)n);
      if (r < 0) {
        err("nghttp2 recv: %s", nghttp2_strerror((int)r));
        conn_kill(c);
        return;
      }
      if (n < (ssize_t)sizeof b) break;
    }
  }
  conn_flush(c);
}
static void poll_once(int ms) {
  struct epoll_event ev[512];
  int n = epoll_wait(g_ep, ev, 512, ms);
  for (int i = 0; i < n; i++) conn_on_event(ev[i].data.ptr, ev[i].events);
}
static void setup(void) {
  signal(SIGPIPE, SIG_IGN);
  g_ep = epoll_create1(EPOLL_CLOEXEC);
  nghttp2_session_callbacks_new(&g_cbs);
  nghttp2_session_callbacks_set_on_header_callback(g_cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(g_cbs, on_data);
  nghttp2_session_callbacks_set_on_stream_close_callback(g_cbs, on_close);
  snprintf(g_authority, sizeof g_authority, "%s:%d", o_host, o_port);
}
static void ready(const char *what) {
  printf("READY %s\n", what);
  fflush(stdout);
}
static void json_common(FILE *f, double t_start) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  fprintf(f, "\"cpu_s\":%.4f,\"wall_s\":%.4f,\"errors\":%ld,\"error_samples\":[", (double)ru.ru_utime.tv_sec +
          (double)ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6,
          now() - t_start, g_nerrors);
  for (long i = 0; i < g_nerrors && i < 8; i++) {
    fputc('"', f);
    for (const char *p = g_errmsg[i]; *p; p++)
      if (*p == '"' || *p == '\\' || (unsigned char)*p < 32) fputc('?', f);
      else fputc(*p, f);
    fprintf(f, "\"%s", i + 1 < g_nerrors && i + 1 < 8 ? "," : "");
  }
  fprintf(f, "]");
}
static void json_lat(FILE *f, lat_t *l) {
  qsort(l->v, l->n, sizeof(double), dcmp);
  if (!l->n) {
    fprintf(f, "\"lat_n\":0,\"p50_ms\":null,\"p99_ms\":null,\"max_ms\":null");
    return;
  }
  fprintf(f, "\"lat_n\":%zu,\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"max_ms\":%.4f", l->n, pct(l, 0.5) * 1e3,
          pct(l, 0.99) * 1e3, l->v[l->n - 1] * 1e3);
}
static uint8_t g_value[100];

/* ---------- watch mode ---------- */
typedef struct {
  int key;          /* key index */
  int64_t watch_id; /* -1 until created */
  int64_t last_rev;
  int64_t *rev;     /* received revisions */
  double *t;        /* receive times */
  size_t n, cap;
} watcher;
typedef struct {
  strm *st;
  int first, count, created; /* watchers [first, first+count) */
} wstream;
static void send_create(wstream *ws);
static watcher *g_w;
static wstream *g_ws;
static long g_created, g_events, g_canceled;
static double g_first_put = -1, g_last_recv;
typedef struct {
  int64_t rev;
  double t;
  int key;
} putrec;
static putrec *g_puts;
static long g_puts_issued, g_puts_done, g_puts_ok, g_inflight_w;

static void key_name(char *b, size_t n, int k) {
  if (o_keys == 1) snprintf(b, n, "%s/fanout", o_prefix);
  else snprintf(b, n, "%s/scale/%06d", o_prefix, k);
}
static void on_watch_msg(strm *st, const uint8_t *m, size_t n) {
  wstream *ws = &g_ws[st->idx];
  double t = now();
  const uint8_t *p = m, *e = m + n;
  pbf f;
  int64_t wid = 0;
  int created = 0, canceled = 0;
  char reason[100] = "";
  /* first pass: ids and flags (events may precede them in field order) */
  while (pb_next(&p, e, &f) == 1) {
    if (f.field == 2 && f.wt == 0) wid = (int64_t)f.v;
    else if (f.field == 3 && f.wt == 0) created = (int)f.v;
    else if (f.field == 4 && f.wt == 0) canceled = (int)f.v;
    else if (f.field == 6 && f.wt == 2) snprintf(reason, sizeof reason, "%.*s", (int)f.n, f.d);
  }
  if (created) {
    if (ws->created >= ws->count) {
      err("unexpected created response");
      return;
    }
    g_w[ws->first + ws->created++].watch_id = wid;
    g_created++;
    /* like clientv3: the next create goes out only after this one is acknowledged, because
       proxies may answer pipelined creates out of order */
    if (ws->created < ws->count) send_create(ws);
    return;
  }
  watcher *w = NULL;
  for (int i = 0; i < ws->count; i++)
    if (g_w[ws->first + i].watch_id == wid) w = &g_w[ws->first + i];
  if (canceled) {
    g_canceled++;
    err("watch %lld canceled: %s", (long long)wid, reason);
    return;
  }
  p = m;
  while (pb_next(&p, e, &f) == 1) {
    if (f.field != 11 || f.wt != 2) continue;
    if (!w) {
      err("event for unknown watch id %lld", (long long)wid);
      return;
    }
    const uint8_t *q = f.d, *qe = f.d + f.n;
    pbf g;
    int64_t rev = -1;
    char key[128], want[128];
    key[0] = 0;
    while (pb_next(&q, qe, &g) == 1)
      if (g.field == 2 && g.wt == 2) { /* kv */
        const uint8_t *r = g.d, *re = g.d + g.n;
        pbf h;
        while (pb_next(&r, re, &h) == 1) {
          if (h.field == 3 && h.wt == 0) rev = (int64_t)h.v;
          else if (h.field == 1 && h.wt == 2) snprintf(key, sizeof key, "%.*s", (int)h.n, h.d);
        }
      }
    key_name(want, sizeof want, w->key);
    if (strcmp(key, want)) err("watcher on %s got key %s", want, key);
    if (rev <= w->last_rev) err("out of order: rev %lld after %lld", (long long)rev, (long long)w->last_rev);
    w->last_rev = rev;
    if (w->n == w->cap) {
      w->cap = w->cap ? w->cap * 2 : 64;
      w->rev = realloc(w->rev, w->cap * sizeof(int64_t));
      w->t = realloc(w->t, w->cap * sizeof(double));
      if (!w->rev || !w->t) die("out of memory");
    }
    w->rev[w->n] = rev;
    w->t[w->n++] = t;
    g_events++;
    g_last_recv = t;
  }
}
static void send_create(wstream *ws) {
  char k[128];
  key_name(k, sizeof k, g_w[ws->first + ws->created].key);
  uint8_t cr[200], req[220];
  size_t n = pb_bytes(cr, 1, k, strlen(k));
  n = pb_bytes(req, 1, cr, n); /* WatchRequest.create_request */
  strm_send(ws->st, req, n, 0);
}
static void put_done(strm *st, int ok) {
  g_puts_done++;
  g_inflight_w--;
  if (!ok) return;
  int64_t rev = pb_header_rev(st->resp, st->resp_n);
  putrec *r = &g_puts[g_puts_ok++];
  r->rev = rev;
  r->t = st->t0;
  r->key = (int)st->tag;
}
static void issue_put(conn *c, int key, done_cb cb, int idx) {
  char k[128];
  if (o_keys == 0) snprintf(k, sizeof k, "%s/put/%ld", o_prefix, g_puts_issued);
  else key_name(k, sizeof k, key);
  uint8_t msg[400];
  size_t n = pb_bytes(msg, 1, k, strlen(k));
  n += pb_bytes(msg + n, 2, g_value, sizeof g_value);
  unary(c, "/etcdserverpb.KV/Put", msg, n, cb, idx, (uint64_t)key)->quiet = 1;
  g_puts_issued++;
}
static int cmp_put(const void *a, const void *b) {
  const putrec *x = a, *y = b;
  return x->rev < y->rev ? -1 : x->rev > y->rev;
}
static int mode_watch(void) {
  double t_start = now(), deadline = t_start + o_timeout;
  g_msg_handler = on_watch_msg;
  int nstreams = o_conns * o_streams;
  if (o_watchers > nstreams * o_per_stream) die("watchers > conns*streams*per-stream");
  g_w = xcalloc((size_t)o_watchers, sizeof *g_w);
  g_ws = xcalloc((size_t)nstreams, sizeof *g_ws);
  g_puts = xcalloc((size_t)o_puts, sizeof *g_puts);
  conn **cs = xcalloc((size_t)o_conns, sizeof *cs);
  for (int i = 0; i < o_conns; i++) cs[i] = conn_new(o_port, i);
  int wi = 0;
  for (int si = 0; si < nstreams && wi < o_watchers; si++) {
    wstream *ws = &g_ws[si];
    ws->first = wi;
    ws->st = open_stream(cs[si % o_conns], "/etcdserverpb.Watch/Watch", K_WATCH);
    ws->st->idx = si;
    for (int j = 0; j < o_per_stream && wi < o_watchers; j++, wi++) {
      g_w[wi].key = wi % o_keys;
      g_w[wi].watch_id = -1;
      ws->count++;
    }
    send_create(ws);
  }
  for (int i = 0; i < o_conns; i++) conn_flush(cs[i]);
  double create_end = t_start + o_create < deadline ? t_start + o_create : deadline;
  while (g_created < o_watchers && now() < create_end && !g_canceled) {
    int live = 0;
    for (int i = 0; i < o_conns; i++) live += !cs[i]->dead;
    if (!live) break; /* every connection failed: nothing more will be created */
    poll_once(5);
  }
  double t_created = now();
  int all_created = g_created == o_watchers;
  if (!all_created) err("only %ld of %d watchers created in %.1fs", g_created, o_watchers, now() - t_start);
  char what[80];
  snprintf(what, sizeof what, "watchers=%ld create_s=%.3f", g_created, t_created - t_start);
  ready(what);
  /* writer: one connection straight to etcd, so only the watch path differs between targets */
  if (all_created) {
    conn *wc = conn_new(o_wport, -1);
    wc->finished = 1; /* etcd closing it at the end is fine */
    /* let the writer connection come up and the watchers settle */
    double t_settle = now() + 0.3;
    while (now() < t_settle) poll_once(5);
    double t0 = now(), next = t0;
    g_first_put = t0;
    while (g_puts_done < o_puts && now() < deadline && !wc->dead) {
      double t = now();
      while (g_puts_issued < o_puts &&
             (o_rate > 0 ? t >= next : g_inflight_w < o_inflight)) {
        issue_put(wc, (int)(g_puts_issued % o_keys), put_done, 0);
        g_inflight_w++;
        next += o_rate > 0 ? 1.0 / o_rate : 0;
      }
      conn_flush(wc);
      int ms = 1;
      if (o_rate > 0 && g_puts_issued < o_puts) {
        double wait = next - now();
        ms = wait > 0.002 ? (int)(wait * 1000) : 0;
      }
      poll_once(ms);
    }
  }
  double t_writes_done = now();
  ready("writes-done");
  /* The reference history of a key is every revision the writer got back for it plus any revision a
     watcher saw on it that the writer never got back (a put that timed out but committed): only this
     run's writer touches these keys. Each watcher must hold exactly that history, strictly increasing
     (checked on receipt), so a count check per watcher completes the proof. */
  qsort(g_puts, (size_t)g_puts_ok, sizeof *g_puts, cmp_put);
  long *per_key = xcalloc((size_t)o_keys, sizeof(long));
  for (long i = 0; i < g_puts_ok; i++) per_key[g_puts[i].key]++;
  putrec *unk = NULL;
  size_t nunk = 0, capunk = 0;
  long expected = 0;
  double drain_end = t_writes_done + o_drain < deadline ? t_writes_done + o_drain : deadline;
  for (int gave_up = 0;;) {
    /* (re)collect revisions the writer never got back; events per watcher never exceed its reference, so
       g_events == expected means every watcher is complete */
    nunk = 0;
    for (int i = 0; i < o_watchers; i++) {
      watcher *w = &g_w[i];
      for (size_t j = 0; j < w->n; j++) {
        putrec key = {.rev = w->rev[j]};
        if (bsearch(&key, g_puts, (size_t)g_puts_ok, sizeof *g_puts, cmp_put)) continue;
        if (nunk == capunk) {
          capunk = capunk ? capunk * 2 : 64;
          unk = realloc(unk, capunk * sizeof *unk);
          if (!unk) die("out of memory");
        }
        unk[nunk].rev = w->rev[j];
        unk[nunk++].key = w->key;
      }
    }
    qsort(unk, nunk, sizeof *unk, cmp_put);
    size_t u = 0;
    for (size_t j = 0; j < nunk; j++)
      if (!u || unk[j].rev != unk[u - 1].rev) unk[u++] = unk[j];
    nunk = u;
    expected = 0;
    for (int i = 0; i < o_watchers; i++) {
      expected += per_key[g_w[i].key];
      for (size_t j = 0; j < nunk; j++) expected += unk[j].key == g_w[i].key;
    }
    if (gave_up || g_events >= expected) break;
    while (g_events < expected && now() < drain_end) {
      double last = g_last_recv > t_writes_done ? g_last_recv : t_writes_done;
      if (now() - last > o_idle) break;
      poll_once(5);
    }
    if (g_events < expected) gave_up = 1; /* one more pass for the final tally */
  }
  double t_end = now();
  g_stopping = 1;
  long *ref = xcalloc((size_t)o_keys, sizeof(long));
  for (int k = 0; k < o_keys; k++) ref[k] = per_key[k];
  for (size_t j = 0; j < nunk; j++) ref[unk[j].key]++;
  lat_t lat = {0};
  long missing = 0, lagging = 0;
  for (int i = 0; i < o_watchers; i++) {
    watcher *w = &g_w[i];
    if ((long)w->n < ref[w->key]) {
      missing += ref[w->key] - (long)w->n;
      lagging++;
    }
    for (size_t j = 0; j < w->n; j++) {
      putrec key = {.rev = w->rev[j]};
      putrec *r = bsearch(&key, g_puts, (size_t)g_puts_ok, sizeof *g_puts, cmp_put);
      if (r) lat_add(&lat, w->t[j] - r->t);
    }
  }
  if (missing) {
    double sp = g_last_recv - g_first_put;
    char since[64] = "no event received";
    if (g_events) snprintf(since, sizeof since, "%.1fs after the last event", t_end - g_last_recv);
    err("%ld of %ld events not delivered to %ld watchers (lost or too slow: %.0f events/s; gave up %.1fs after the "
        "last put, %s)",
        missing, expected, lagging, g_events && sp > 0 ? (double)g_events / sp : 0.0, t_end - t_writes_done, since);
  }
  double span = g_last_recv - g_first_put;
  printf("RESULT {\"mode\":\"watch\",\"watchers\":%d,\"created\":%ld,\"create_s\":%.4f,\"puts\":%ld,"
         "\"put_span_s\":%.4f,\"events\":%ld,\"expected\":%ld,\"missing\":%ld,\"canceled\":%ld,"
         "\"events_per_s\":%.1f,\"deliver_s\":%.4f,",
         o_watchers, g_created, t_created - t_start, g_puts_ok, g_first_put > 0 ? t_writes_done - g_first_put : 0.0,
         g_events, expected,
         missing, g_canceled, g_events && span > 0 ? (double)g_events / span : 0, g_events ? span : 0.0);
  printf("\"put_failed\":%ld,\"put_error\":\"%s\",\"unknown_revs\":%zu,", g_wfail, g_wmsg, nunk);
  json_lat(stdout, &lat);
  printf(",");
  json_common(stdout, t_start);
  printf("}\n");
  fflush(stdout);
  return 0;
}

/* ---------- lease mode ---------- */
typedef struct {
  int64_t id;
  double sent; /* >0 while a keepalive is outstanding */
} lease;
static lease *g_l;
static long g_granted, g_grant_issued, g_ka_ok, g_ka_sent;
static int g_sending = 1;
static lat_t g_lat;
typedef struct {
  strm *st;
  int first, count, next, outstanding;
} lclient;
static lclient *g_lc;
/* open addressing map lease id -> index */
static int64_t *g_hk;
static int *g_hv;
static size_t g_hcap;
static void hput(int64_t k, int v) {
  size_t i = (size_t)((uint64_t)k * 0x9E3779B97F4A7C15ULL) & (g_hcap - 1);
  while (g_hk[i]) i = (i + 1) & (g_hcap - 1);
  g_hk[i] = k;
  g_hv[i] = v;
}
static int hget(int64_t k) {
  size_t i = (size_t)((uint64_t)k * 0x9E3779B97F4A7C15ULL) & (g_hcap - 1);
  while (g_hk[i]) {
    if (g_hk[i] == k) return g_hv[i];
    i = (i + 1) & (g_hcap - 1);
  }
  return -1;
}
static void grant_done(strm *st, int ok) {
  g_inflight_w--;
  if (!ok) return;
  const uint8_t *p = st->resp, *e = st->resp + st->resp_n;
  pbf f;
  int64_t id = 0;
  while (pb_next(&p, e, &f) == 1)
    if (f.field == 2 && f.wt == 0) id = (int64_t)f.v;
  if (!id) {
    err("lease grant without ID");
    return;
  }
  g_l[g_granted].id = id;
  hput(id, (int)g_granted);
  g_granted++;
}
static void send_keepalive(lclient *lc) {
  int li = lc->first + lc->next;
  lc->next = (lc->next + 1) % lc->count;
  if (g_l[li].sent > 0) return; /* still outstanding (window > leases): skip */
  uint8_t msg[16];
  size_t n = pb_varint(msg, 1, (uint64_t)g_l[li].id);
  g_l[li].sent = now();
  lc->outstanding++;
  g_ka_sent++;
  strm_send(lc->st, msg, n, 0);
}
static void on_lease_msg(strm *st, const uint8_t *m, size_t n) {
  lclient *lc = &g_lc[st->idx];
  const uint8_t *p = m, *e = m + n;
  pbf f;
  int64_t id = 0, ttl = 0;
  while (pb_next(&p, e, &f) == 1) {
    if (f.field == 2 && f.wt == 0) id = (int64_t)f.v;
    else if (f.field == 3 && f.wt == 0) ttl = (int64_t)f.v;
  }
  int li = hget(id);
  if (li < 0 || li < lc->first || li >= lc->first + lc->count || g_l[li].sent <= 0) {
    err("unexpected keepalive response for lease %llx", (unsigned long long)id);
    return;
  }
  if (ttl <= 0) err("keepalive for lease %llx answered TTL %lld", (unsigned long long)id, (long long)ttl);
  else g_ka_ok++;
  lat_add(&g_lat, now() - g_l[li].sent);
  g_l[li].sent = 0;
  lc->outstanding--;
  if (g_sending) send_keepalive(lc);
}
static int mode_lease(void) {
  double t_start = now(), deadline = t_start + o_timeout;
  g_msg_handler = on_lease_msg;
  g_l = xcalloc((size_t)o_leases, sizeof *g_l);
  for (g_hcap = 1024; g_hcap < (size_t)o_leases * 4; g_hcap *= 2) {
  }
  g_hk = xcalloc(g_hcap, sizeof *g_hk);
  g_hv = xcalloc(g_hcap, sizeof *g_hv);
  /* grant straight at etcd */
  conn *gc = conn_new(o_wport, -1);
  while (g_grant_issued < o_leases && now() < deadline && !gc->dead) {
    while (g_grant_issued < o_leases && g_inflight_w < 64) {
      uint8_t msg[16];
      size_t n = pb_varint(msg, 1, (uint64_t)o_ttl);
      unary(gc, "/etcdserverpb.Lease/LeaseGrant", msg, n, grant_done, 0, 0);
      g_grant_issued++;
      g_inflight_w++;
    }
    conn_flush(gc);
    poll_once(5);
  }
  while (g_inflight_w > 0 && now() < deadline && !gc->dead) poll_once(5);
  if (g_granted < o_leases) {
    err("only %ld of %d leases granted", g_granted, o_leases);
    printf("RESULT {\"mode\":\"lease\",");
    json_common(stdout, t_start);
    printf("}\n");
    return 0;
  }
  g_lc = xcalloc((size_t)o_conns, sizeof *g_lc);
  conn **cs = xcalloc((size_t)o_conns, sizeof *cs);
  int per = o_leases / o_conns;
  for (int i = 0; i < o_conns; i++) {
    cs[i] = conn_new(o_port, i);
    lclient *lc = &g_lc[i];
    lc->first = i * per;
    lc->count = i == o_conns - 1 ? o_leases - lc->first : per;
    lc->st = open_stream(cs[i], "/etcdserverpb.Lease/LeaseKeepAlive", K_LEASE);
    lc->st->idx = i;
  }
  ready("leases");
  double t0 = now(), t_stop = t0 + o_duration;
  for (int i = 0; i < o_conns; i++) {
    for (int j = 0; j < o_window && j < g_lc[i].count; j++) send_keepalive(&g_lc[i]);
    conn_flush(cs[i]);
  }
  while (now() < t_stop && now() < deadline) poll_once(5);
  double t1 = now();
  long ok_at_stop = g_ka_ok;
  g_sending = 0;
  long outstanding = 0;
  double wait = o_ttl / 3.0 + 2;
  double drain_end = now() + wait < deadline ? now() + wait : deadline;
  for (;;) {
    outstanding = 0;
    for (int i = 0; i < o_conns; i++) outstanding += g_lc[i].outstanding;
    if (!outstanding || now() >= drain_end) break;
    poll_once(5);
  }
  g_stopping = 1;
  if (outstanding) err("%ld keepalives unanswered %.1fs after the last was sent", outstanding, wait);
  printf("RESULT {\"mode\":\"lease\",\"leases\":%d,\"clients\":%d,\"window\":%d,\"sent\":%ld,\"answered\":%ld,"
         "\"unanswered\":%ld,\"rate\":%.1f,",
         o_leases, o_conns, o_window, g_ka_sent, g_ka_ok, outstanding, (double)ok_at_stop / (t1 - t0));
  json_lat(stdout, &g_lat);
  printf(",");
  json_common(stdout, t_start);
  printf("}\n");
  fflush(stdout);
  return 0;
}

/* ---------- unary mode ---------- */
static long g_ok, g_fail, g_unary_issued;
static int g_unary_go = 1;
static conn **g_uc;
static void unary_issue(conn *c);
static void unary_done(strm *st, int ok) {
  if (ok) {
    g_ok++;
    lat_add(&g_lat, now() - st->t0);
  } else {
    g_fail++;
  }
  if (g_unary_go) unary_issue(st->c);
}
static void unary_issue(conn *c) {
  g_unary_issued++;
  if (!strcmp(o_method, "put")) {
    char k[128];
    snprintf(k, sizeof k, "%s/put/%ld", o_prefix, g_puts_issued++);
    uint8_t msg[400];
    size_t n = pb_bytes(msg, 1, k, strlen(k));
    n += pb_bytes(msg + n, 2, g_value, sizeof g_value);
    unary(c, "/etcdserverpb.KV/Put", msg, n, unary_done, 0, 0);
  } else {
    char k[128];
    snprintf(k, sizeof k, "%s/hot", o_prefix);
    uint8_t msg[200];
    size_t n = pb_bytes(msg, 1, k, strlen(k));
    if (o_serializable) n += pb_varint(msg + n, 7, 1);
    unary(c, "/etcdserverpb.KV/Range", msg, n, unary_done, 0, 0);
  }
}
static int mode_unary(void) {
  double t_start = now();
  g_uc = xcalloc((size_t)o_conns, sizeof *g_uc);
  for (int i = 0; i < o_conns; i++) {
    g_uc[i] = conn_new(o_port, i);
    for (int j = 0; j < o_inflight; j++) unary_issue(g_uc[i]);
    conn_flush(g_uc[i]);
  }
  double t0 = now(), t_stop = t0 + o_duration;
  while (now() < t_stop) poll_once(5);
  double t1 = now();
  long ok = g_ok;
  g_unary_go = 0;
  double drain = now() + 5;
  while (g_ok + g_fail < g_unary_issued && now() < drain) poll_once(5);
  g_stopping = 1;
  printf("RESULT {\"mode\":\"unary\",\"method\":\"%s\",\"ok\":%ld,\"failed\":%ld,\"qps\":%.1f,", o_method, g_ok, g_fail,
         (double)ok / (t1 - t0));
  json_lat(stdout, &g_lat);
  printf(",");
  json_common(stdout, t_start);
  printf("}\n");
  return 0;
}

/* ---------- storm mode: one Range per fresh connection ---------- */
static int g_storm_started, g_storm_done;
static void storm_done(strm *st, int ok) {
  st->c->finished = 1;
  if (ok) {
    g_ok++;
    lat_add(&g_lat, now() - st->c->t0);
  } else {
    g_fail++;
  }
}
static conn *storm_start(void) {
  conn *c = conn_new(o_port, g_storm_started++);
  char k[128];
  snprintf(k, sizeof k, "%s/hot", o_prefix);
  uint8_t msg[200];
  size_t n = pb_bytes(msg, 1, k, strlen(k));
  n += pb_varint(msg + n, 7, 1);
  unary(c, "/etcdserverpb.KV/Range", msg, n, storm_done, 0, 0);
  conn_flush(c);
  return c;
}
static int mode_storm(void) {
  double t_start = now(), deadline = t_start + o_timeout;
  conn **slot = xcalloc((size_t)o_parallel, sizeof *slot);
  for (int i = 0; i < o_parallel && g_storm_started < o_storm; i++) slot[i] = storm_start();
  while (g_storm_done < o_storm && now() < deadline) {
    poll_once(5);
    for (int i = 0; i < o_parallel; i++) {
      conn *c = slot[i];
      if (!c || !(c->finished || c->dead || now() - c->t0 > 10)) continue;
      if (!c->finished) {
        g_fail++;
        if (!c->dead) err("storm connection timed out");
      }
      conn_free(c);
      g_storm_done++;
      slot[i] = g_storm_started < o_storm ? storm_start() : NULL;
    }
  }
  double t1 = now();
  g_stopping = 1;
  printf("RESULT {\"mode\":\"storm\",\"conns\":%d,\"ok\":%ld,\"failed\":%ld,\"qps\":%.1f,", o_storm, g_ok, g_fail,
         (double)g_ok / (t1 - t_start));
  json_lat(stdout, &g_lat);
  printf(",");
  json_common(stdout, t_start);
  printf("}\n");
  return 0;
}

static void usage(void) {
  fprintf(stderr,
          "usage: h2bench --mode=watch|lease|unary|storm --port=P [--writer-port=P] [--conns=N]\n"
          "  watch: --streams=S --per-stream=K --watchers=W --keys=N --puts=N --rate=R(0=burst) --inflight=N "
          "--drain=S --idle=S --create-timeout=S\n"
          "  lease: --leases=N --conns=N --window=N --duration=S --ttl=S\n"
          "  unary: --method=put|range --serializable=0|1 --conns=N --inflight=N --duration=S\n"
          "  storm: --storm=N --parallel=N\n"
          "  all: --prefix=KEYPREFIX --timeout=S --host=IP\n");
  exit(2);
}
int main(int argc, char **argv) {
  static struct option opts[] = {
      {"mode", 1, 0, 'm'},     {"port", 1, 0, 'p'},        {"writer-port", 1, 0, 'W'}, {"conns", 1, 0, 'c'},
      {"streams", 1, 0, 's'},  {"per-stream", 1, 0, 'k'},  {"watchers", 1, 0, 'w'},    {"keys", 1, 0, 'K'},
      {"puts", 1, 0, 'n'},     {"rate", 1, 0, 'r'},        {"inflight", 1, 0, 'i'},    {"duration", 1, 0, 'd'},
      {"timeout", 1, 0, 't'},  {"drain", 1, 0, 'D'}, {"idle", 1, 0, 'I'}, {"ttl", 1, 0, 'T'}, {"create-timeout", 1, 0, 'C'},       {"leases", 1, 0, 'l'},      {"window", 1, 0, 'x'},
      {"storm", 1, 0, 'S'},    {"parallel", 1, 0, 'P'},    {"prefix", 1, 0, 'f'},      {"method", 1, 0, 'M'},
      {"serializable", 1, 0, 'z'}, {"host", 1, 0, 'h'},    {0, 0, 0, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (ch) {
    case 'm': o_mode = optarg; break;
    case 'p': o_port = atoi(optarg); break;
    case 'W': o_wport = atoi(optarg); break;
    case 'c': o_conns = atoi(optarg); break;
    case 's': o_streams = atoi(optarg); break;
    case 'k': o_per_stream = atoi(optarg); break;
    case 'w': o_watchers = atoi(optarg); break;
    case 'K': o_keys = atoi(optarg); break;
    case 'n': o_puts = atoi(optarg); break;
    case 'r': o_rate = atof(optarg); break;
    case 'i': o_inflight = atoi(optarg); break;
    case 'd': o_duration = atof(optarg); break;
    case 't': o_timeout = atof(optarg); break;
    case 'D': o_drain = atof(optarg); break;
    case 'I': o_idle = atof(optarg); break;
    case 'T': o_ttl = atoi(optarg); break;
    case 'C': o_create = atof(optarg); break;
    case 'l': o_leases = atoi(optarg); break;
    case 'x': o_window = atoi(optarg); break;
    case 'S': o_storm = atoi(optarg); break;
    case 'P': o_parallel = atoi(optarg); break;
    case 'f': o_prefix = optarg; break;
    case 'M': o_method = optarg; break;
    case 'z': o_serializable = atoi(optarg); break;
    case 'h': snprintf(o_host, sizeof o_host, "%s", optarg); break;
    default: usage();
    }
  }
  if (!o_port || o_conns < 1 || o_keys < 1) usage();
  if (!o_wport) o_wport = o_port;
  for (size_t i = 0; i < sizeof g_value; i++) g_value[i] = (uint8_t)('a' + i % 26);
  setup();
  if (!strcmp(o_mode, "watch")) return mode_watch();
  if (!strcmp(o_mode, "lease")) return mode_lease();
  if (!strcmp(o_mode, "unary")) return mode_unary();
  if (!strcmp(o_mode, "storm")) return mode_storm();
  usage();
  return 2;
}
