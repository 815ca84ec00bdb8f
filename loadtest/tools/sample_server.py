#!/usr/bin/env python3
"""Beside a soak: what the server's memory is made of, minute by minute.

    python3 loadtest/tools/sample_server.py record samples.jsonl [interval_s]  # until interrupted
    python3 loadtest/tools/sample_server.py show samples.jsonl

`record` finds the running `reelbatch` process and every `interval_s` (default 60; use a
few seconds to see between snapshots, whose temporaries lift RSS for a while) appends one
JSON line:
/proc status (RSS split into anonymous and file pages, high-water mark, threads, anonymous
transparent huge pages), resident anonymous memory by kind (allocator arenas, thread
stacks, the C heap: `anon_by_kind`), threads
counted by name (runtime pools growing show here), every file of the data directory over
1 MiB (the on-disk indexes grow by doubling), and the /metrics gauges (index page caches,
batches in memory, idempotency keys, the live heap). Read-only: it sends only GET /metrics.
"""
import json, os, re, subprocess, sys, time, urllib.request, glob, collections

def pid():
    r = subprocess.run(['pgrep', '-x', 'reelbatch'], capture_output=True, text=True).stdout.split()
    return int(r[0]) if r else None

def port(p):
    r = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout
    for line in r.splitlines():
        if f'pid={p},' in line:
            return line.split()[3].rsplit(':', 1)[1]

def status(p):
    d = {}
    for line in open(f'/proc/{p}/status'):
        k, v = line.split(':', 1)
        if k in ('VmRSS', 'RssAnon', 'RssFile', 'RssShmem', 'VmHWM', 'Threads', 'VmData'):
            d[k] = int(v.split()[0])
    # Transparent huge pages: a 2 MiB page is resident whole however little of it is used.
    for line in open(f'/proc/{p}/smaps_rollup'):
        if line.startswith('AnonHugePages:'):
            d['AnonHugePages'] = int(line.split()[1])
    return d

ARENA_BYTES_MIN = 32 << 20


def anon_by_kind(p):
    """Resident anonymous memory (KiB) by what holds it, from /proc/PID/smaps: `stack`
    (a read-write mapping right after a no-access guard page: how pthread lays out a
    thread's stack), `arena` (mappings of 32 MiB or more: the allocator reserves its
    arenas that large), `brk` (the C heap), `other`. Tells whether memory that is not live
    heap sits in the allocator or in thread stacks touched ever deeper."""
    kinds = collections.Counter()
    kind, prev_guard = None, False
    for line in open(f'/proc/{p}/smaps'):
        head = line.split()
        if '-' in head[0] and len(head) >= 5 and ':' not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split('-'))
            perms, path = head[1], (head[5] if len(head) > 5 else '')
            size = hi - lo
            if path == '[heap]':
                kind = 'brk'
            elif path:
                kind = None  # file-backed, [stack] of the main thread, vdso …
            elif perms.startswith('---'):
                kind, prev_guard = None, True
                continue
            elif prev_guard and size < ARENA_BYTES_MIN:
                kind = 'stack'
            elif size >= ARENA_BYTES_MIN:
                kind = 'arena'
            else:
                kind = 'other'
            prev_guard = False
        elif head[0] == 'Rss:' and kind:
            kinds[kind] += int(head[1])
    return dict(kinds)


def threads(p):
    c = collections.Counter(); cpu = collections.Counter()
    for t in glob.glob(f'/proc/{p}/task/*'):
        try:
            s = open(t + '/stat').read()
        except OSError:
            continue
        name = s[s.index('(') + 1:s.rindex(')')]
        f = s[s.rindex(')') + 2:].split()
        name = re.sub(r'\d+$', '#', name)
        c[name] += 1; cpu[name] += int(f[11]) + int(f[12])
    return {k: [c[k], cpu[k]] for k in c}

def datadir(p):
    cmd = open(f'/proc/{p}/cmdline').read().split('\0')
    d = cmd[cmd.index('--data-dir') + 1]
    sizes = {}
    for root, _, files in os.walk(d):
        for f in files:
            fp = os.path.join(root, f)
            try:
                sizes[os.path.relpath(fp, d)] = os.path.getsize(fp)
            except OSError:
                pass
    return sizes

def metrics(pt):
    body = urllib.request.urlopen(f'http://127.0.0.1:{pt}/metrics', timeout=5).read().decode()
    m = {}
    for line in body.splitlines():
        if line.startswith('#') or '_bucket{' in line:
            continue
        k, _, v = line.rpartition(' ')
        try:
            m[k] = float(v)
        except ValueError:
            pass
    return m


WALK_S = 60


def record(path, interval_s=60):
    """Appends one sample every `interval_s` to `path` while a `reelbatch` process runs."""
    out = open(path, 'a')
    t0 = time.time()
    # The data directory holds a file per video (close to a million in an hour's soak):
    # walking it takes seconds, so it is walked at most every WALK_S and reused between.
    walked_at, sizes = None, {}
    while True:
        p = pid()
        if p:
            try:
                s = {'t': round(time.time() - t0), 'pid': p, 'status': status(p), 'threads': threads(p),
                     'anon_kib': anon_by_kind(p)}
                if walked_at is None or time.time() - walked_at >= WALK_S:
                    sizes, walked_at = datadir(p), time.time()
                s['files_total'] = sum(sizes.values())
                s['files_n'] = len(sizes)
                s['files_big'] = {k: v for k, v in sizes.items() if v > 1 << 20}
                pt = port(p)
                if pt:
                    s['metrics'] = metrics(pt)
            except Exception as e:  # the process ended mid-sample: note it, go on
                s = {'t': round(time.time() - t0), 'err': repr(e)}
            out.write(json.dumps(s) + '\n')
            out.flush()
        time.sleep(interval_s)


INDEXES = ('archive/index.redb', 'archive/ops.redb')
QUIET = ('reelbatch', 'wal-writer', 'wal-completer', 'store-syncfs', 'actix-system', 'engine-snapshot')


def kinds(s):
    k = s.get('anon_kib', {})
    return ' '.join(f"{n}={k.get(n, 0) / 1024:.1f}" for n in ('arena', 'stack', 'brk', 'other'))


def show(path):
    """One line per sample: memory (resident, live heap), caches, response index (runs, memory), batches in memory, index file sizes, pools."""
    for line in open(path):
        s = json.loads(line)
        if 'err' in s:
            print(s)
            continue
        st, m = s['status'], s.get('metrics', {})
        cache = sum(v for k, v in m.items() if k.startswith('reelbatch_index_cache_bytes'))
        redb = '/'.join(str(s['files_big'].get(k, 0) >> 20) for k in INDEXES)
        pools = ' '.join(f"{k}={v[0]}" for k, v in s['threads'].items() if k not in QUIET)
        print(f"{s['t'] // 60:3d}m{s['t'] % 60:02d}s rss={st['VmRSS'] / 1024:6.1f} anon={st['RssAnon'] / 1024:6.1f} "
              f"hwm={st['VmHWM'] / 1024:6.1f} {kinds(s)} thp={st.get('AnonHugePages', 0) / 1024:5.1f} heap={m.get('reelbatch_heap_live_bytes', 0) / 2**20:6.1f} "
              f"cache={cache / 2**20:5.1f} runs={int(m.get('reelbatch_response_index_runs', 0))} "
              f"rix={m.get('reelbatch_response_index_memory_bytes', 0) / 2**20:4.1f} "
              f"usage={int(m.get('reelbatch_usage_buckets', 0))} "
              f"access={int(m.get('reelbatch_access_log_entries', 0))} "
              f"batches={int(m.get('reelbatch_batch_directory_batches', 0)):5d} redb_MiB={redb} "
              f"files={s['files_total'] / 2**20:7.1f}MiB threads={st['Threads']} {pools}")


if __name__ == '__main__':
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ('record', 'show'):
        sys.exit(__doc__)
    if sys.argv[1] == 'record':
        record(sys.argv[2], float(sys.argv[3]) if len(sys.argv) == 4 else 60)
    else:
        show(sys.argv[2])
