package batch

import (
	"context"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// Turns of keys, offered and ended one step at a time: a key's operations
// start in the order offered, at most limit at once, and a key with
// nothing running or waiting is forgotten.
func TestKeyTurns(t *testing.T) {
	t.Parallel()
	// A step offers operation i of a key ("+a1": it must start; "+a1
	// waits") or ends one of a key ("-a": no turn passes on; "-a 3":
	// operation 3 takes it).
	cases := []struct {
		name  string
		limit int
		steps string
	}{
		{"one at a time", 1, "+a0 ; +a1 waits ; +b2 ; +a3 waits ; -a 1 ; -b ; -a 3 ; -a"},
		{"waiting ones keep their order", 1, "+a0 ; +a1 waits ; +a2 waits ; -a 1 ; +a3 waits ; -a 2 ; -a 3 ; -a"},
		{"two at a time", 2, "+a0 ; +a1 ; +a2 waits ; +a3 waits ; -a 2 ; -a 3 ; -a ; -a"},
		{"a free place does not let a later one pass", 2, "+a0 ; +a1 ; +a2 waits ; -a 2 ; +a3 waits ; -a 3 ; -a ; -a"},
		{"keys apart", 1, "+a0 ; +b1 ; +c2 ; +a3 waits ; -b ; -c ; -a 3 ; -a"},
		{"a key comes back", 1, "+a0 ; -a ; +a1 ; +a2 waits ; -a 2 ; -a"},
	}
	for _, tc := range cases {
		kt := newKeyTurns(tc.limit)
		for _, step := range strings.Split(tc.steps, " ; ") {
			f := strings.Fields(step)
			key := f[0][1:2]
			if f[0][0] == '+' {
				i, _ := strconv.Atoi(f[0][2:])
				want := len(f) == 1
				if got := kt.offer(key, i); got != want {
					t.Errorf("%s: %s: started %v", tc.name, step, got)
				}
				continue
			}
			want := -1
			if len(f) == 2 {
				want, _ = strconv.Atoi(f[1])
			}
			if got := kt.done(key); got != want {
				t.Errorf("%s: %s: turn passed to %d", tc.name, step, got)
			}
		}
		if len(kt.keys) != 0 {
			t.Errorf("%s: %d keys kept after every operation ended", tc.name, len(kt.keys))
		}
	}
}

// The turns of 100,000 keys cost what is in flight, not what has been
// seen: a job of a million accounts keeps no entry per account.
func TestKeyTurnsForgetKeys(t *testing.T) {
	t.Parallel()
	const inFlight = 20
	kt := newKeyTurns(1)
	var running []string
	most := 0
	for i := range 100_000 {
		if len(running) == inFlight {
			if kt.done(running[0]) != -1 {
				t.Fatal("a turn passed to an operation never offered")
			}
			running = running[1:]
		}
		k := "account-" + strconv.Itoa(i)
		if !kt.offer(k, i) {
			t.Fatalf("operation %d of a new key waits", i)
		}
		running = append(running, k)
		most = max(most, len(kt.keys))
	}
	if most > inFlight {
		t.Errorf("%d keys held at once for %d operations in flight", most, inFlight)
	}
}

// key_concurrency: the handler's option, and the batch field that
// overrides it, bounded.
func TestKeyConcurrencyField(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, &Handler{KeyConcurrency: 3})
	for body, want := range map[string]int{
		`{"batch":[{"path":"/a","key":"k"}]}`:                       3,
		`{"key_concurrency":2,"batch":[{"path":"/a","key":"k"}]}`:   2,
		`{"key_concurrency":1e1,"batch":[{"path":"/a","key":"k"}]}`: 10,
	} {
		b, err := parseBatch(context.Background(), []byte(body), &h.rules)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		if got := (&runner{h: h, b: b}).keyConcurrency(); got != want {
			t.Errorf("%s: key_concurrency %d, want %d", body, got, want)
		}
	}
	// A CSV batch takes it, and the key, from the query.
	q, _ := url.ParseQuery("method=GET&path=/k/{{item.a}}&key={{item.a}}&key_concurrency=2")
	body, _, err := csvBatch(strings.NewReader("a\nx\ny\n"), q, &h.rules, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	b, err := parseBatch(context.Background(), body, &h.rules)
	if err != nil || b.keyConcurrency != 2 || b.ops[1].key != "y" {
		t.Errorf("CSV batch: %v %+v", err, b)
	}
	for _, bad := range []string{`0`, `-1`, `1.5`, `"2"`, `true`, `null`, `10001`, `1e100`} {
		_, err := parseBatch(context.Background(), []byte(`{"key_concurrency":`+bad+`,"batch":[{"path":"/a"}]}`), &h.rules)
		if err == nil || !strings.Contains(err.Error(), "key_concurrency must be a whole number from 1 to 10000") {
			t.Errorf("key_concurrency %s: %v", bad, err)
		}
	}
}

// Dependencies that would have an operation wait for a later one of its
// own key are refused before anything runs: a key's operations start in
// submission order, and such a batch would never end.
func TestKeyOrderCycles(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, &Handler{Mode: modeParallel})
	cases := []struct {
		name, batch, fault string // fault "" when valid
	}{
		{"depends on a later one of its key",
			`[{"id":"a","key":"k","depends_on":["b"]},{"id":"b","key":"k"}]`,
			`dependency cycle: a -> b -> a, as operations of key \"k\" start in submission order`},
		{"through another key",
			`[{"id":"a","key":"k","depends_on":["x"]},{"id":"x","key":"j","depends_on":["b"]},{"id":"b","key":"k"}]`,
			`dependency cycle: a -> x -> b -> a, as operations of key \"k\" start in submission order`},
		{"through a key met on the way",
			`[{"id":"x","depends_on":["a"]},{"id":"a","key":"k","depends_on":["y"]},{"id":"y"},{"id":"b","key":"k"},{"id":"z","depends_on":["b"]},{"id":"w","key":"k"}]`,
			""},
		{"depends on an earlier one of its key", `[{"id":"a","key":"k"},{"id":"b","key":"k","depends_on":["a"]}]`, ""},
		{"on a later one of another key", `[{"id":"a","key":"k","depends_on":["b"]},{"id":"b","key":"j"},{"id":"c","key":"k"}]`, ""},
		{"a plain cycle", `[{"id":"a","key":"k","depends_on":["b"]},{"id":"b","depends_on":["a"]}]`, `dependency cycle: a -> b -> a"`},
	}
	for _, tc := range cases {
		batch := strings.ReplaceAll(tc.batch, `{"id"`, `{"path":"/x","id"`)
		_, err := parseBatch(context.Background(), []byte(`{"mode":"parallel","batch":`+batch+`}`), &h.rules)
		switch {
		case tc.fault == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.fault != "" && (err == nil || !strings.Contains(fmt.Sprintf("%q", err.Error()), tc.fault)):
			t.Errorf("%s: %v, want %s", tc.name, err, tc.fault)
		}
	}
}

// keyRig runs operations of keys through a runner without Caddy, into a
// downstream handler that records when each starts and ends and keeps
// the held ones until release.
type keyRig struct {
	t     *testing.T
	h     *Handler
	b     *batch
	mu    sync.Mutex
	start []int // operations in the order they started
	ended map[int]bool
	// inFlight and most count each key's operations downstream.
	inFlight, most map[string]int
	held           map[int]bool
	hold           chan struct{}
	got            []int // results, in the order the sink took them
}

// newKeyRig parses ops, operations with a key each ("-" for none), as a
// parallel batch at concurrency 4 and key_concurrency limit; the
// operations in held wait downstream until release.
func newKeyRig(t *testing.T, limit int, keys string, held ...int) *keyRig {
	t.Helper()
	h := handlerAlone(t, &Handler{Mode: modeParallel, Concurrency: 4, KeyConcurrency: limit, MaxOps: 10000})
	h.logger = zap.NewNop()
	var sb strings.Builder
	sb.WriteByte('[')
	for i, k := range keys {
		if i > 0 {
			sb.WriteByte(',')
		}
		if k == '-' {
			fmt.Fprintf(&sb, `{"path":"/-/%d"}`, i)
		} else {
			fmt.Fprintf(&sb, `{"path":"/%c/%d","key":"%c"}`, k, i, k)
		}
	}
	sb.WriteByte(']')
	b, err := parseBatch(context.Background(), []byte(sb.String()), &h.rules)
	if err != nil {
		t.Fatal(err)
	}
	r := &keyRig{t: t, h: h, b: b, ended: map[int]bool{}, inFlight: map[string]int{}, most: map[string]int{},
		held: map[int]bool{}, hold: make(chan struct{})}
	for _, i := range held {
		r.held[i] = true
	}
	return r
}

func (r *keyRig) ServeHTTP(w http.ResponseWriter, req *http.Request) error {
	key, n, _ := strings.Cut(strings.TrimPrefix(req.URL.Path, "/"), "/")
	i, _ := strconv.Atoi(n)
	r.mu.Lock()
	r.start = append(r.start, i)
	r.inFlight[key]++
	r.most[key] = max(r.most[key], r.inFlight[key])
	r.mu.Unlock()
	if r.held[i] {
		<-r.hold
	}
	r.mu.Lock()
	r.inFlight[key]--
	r.ended[i] = true
	r.mu.Unlock()
	return nil
}

func (r *keyRig) put(i int, _ *operation, res *result) {
	if res.status != http.StatusOK {
		r.t.Errorf("operation %d: %d %s", i, res.status, res.err)
	}
	r.got = append(r.got, i)
}

func (r *keyRig) close(summary) {}

// runner returns a runner of the rig's batch, bounded by a deadline.
func (r *keyRig) runner() *runner {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	r.t.Cleanup(cancel)
	rn := &runner{h: r.h, next: r, srv: &caddyhttp.Server{}, base: ctx, timeout: 20 * time.Second, pace: &pace.Owner{}}
	rn.load(r.b)
	rn.refs.reset(r.h.MaxReferenceSize)
	return rn
}

// runBatch runs the rig's operations as a sync batch does.
func (r *keyRig) runBatch() { r.runner().runFrom(r, 0) }

// runJob runs the rig's operations as a streamed job does, from src.
func (r *keyRig) runJob(src opSource) {
	if err := r.runner().runStream(src, r, 0); err != nil {
		r.t.Error(err)
	}
}

// started and hasEnded report what the downstream handler has seen.
func (r *keyRig) started(i int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.start, i)
}

func (r *keyRig) hasEnded(ops ...int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, i := range ops {
		if !r.ended[i] {
			return false
		}
	}
	return true
}

// opsOf returns the operations of key k ('-' for none).
func (r *keyRig) opsOf(keys string, k rune) []int {
	var ops []int
	for i, c := range keys {
		if c == k {
			ops = append(ops, i)
		}
	}
	return ops
}

// sliceSource yields a batch's operations as a job's chunks do; check
// sees each index before it is read.
type sliceSource struct {
	ops   []*operation
	n     int
	check func(i int)
}

func (s *sliceSource) next() (*operation, error) {
	if s.n == len(s.ops) {
		return nil, nil
	}
	if s.check != nil {
		s.check(s.n)
	}
	s.n++
	return s.ops[s.n-1], nil
}

// While an operation of a key is held downstream, the later ones of its
// key wait and those of other keys, and without one, run on; once it
// ends, its key's operations start in submission order, never more than
// key_concurrency at once, and the results come in submission order. In
// a sync batch and in a job.
func TestKeyScheduling(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		limit int
		keys  string // each operation's key, '-' for none
		held  []int  // held downstream until released
	}{
		{"one at a time", 1, "aabacb-a-bcc", []int{0}},
		{"two at a time", 2, "aaab-aacba", []int{0, 1}},
		{"held in the middle of its key", 1, "abab-aba", []int{2}},
		{"without keys", 1, "----------", []int{0}},
	}
	for _, tc := range cases {
		for _, how := range []string{"batch", "job"} {
			t.Run(tc.name+"/"+how, func(t *testing.T) {
				t.Parallel()
				r := newKeyRig(t, tc.limit, tc.keys, tc.held...)
				heldKey := rune(tc.keys[tc.held[0]])
				finished := make(chan struct{})
				go func() {
					defer close(finished)
					if how == "batch" {
						r.runBatch()
					} else {
						r.runJob(&sliceSource{ops: r.b.ops})
					}
				}()
				// Everything of other keys ends while the held ones wait.
				var others, waiting []int
				for i, c := range tc.keys {
					switch {
					case r.held[i]:
					case c != heldKey || c == '-':
						others = append(others, i)
					case i > tc.held[len(tc.held)-1]:
						waiting = append(waiting, i)
					}
				}
				eventually(t, 10*time.Second, "operations of other keys to end while one is held", func() bool {
					return r.hasEnded(others...) && r.started(tc.held[len(tc.held)-1])
				})
				for _, i := range waiting {
					if r.started(i) {
						t.Errorf("operation %d of key %c started while %v of its key were held", i, heldKey, tc.held)
					}
				}
				close(r.hold)
				receive(t, 10*time.Second, "the operations to end", finished)

				if len(r.got) != len(tc.keys) {
					t.Fatalf("%d results for %d operations", len(r.got), len(tc.keys))
				}
				for i, got := range r.got {
					if got != i {
						t.Fatalf("results in the order %v", r.got)
					}
				}
				for k, most := range r.most {
					if k != "-" && most > tc.limit {
						t.Errorf("key %s had %d operations downstream at once, key_concurrency %d", k, most, tc.limit)
					}
				}
				if tc.limit > 1 && heldKey != '-' && r.most[string(heldKey)] != tc.limit {
					t.Errorf("key %c had at most %d operations downstream at once, key_concurrency %d allows %[3]d", heldKey, r.most[string(heldKey)], tc.limit)
				}
				if tc.limit == 1 {
					for _, k := range "abc" {
						var order []int
						for _, i := range r.start {
							if rune(tc.keys[i]) == k {
								order = append(order, i)
							}
						}
						if want := r.opsOf(tc.keys, k); !slices.Equal(order, want) {
							t.Errorf("key %c started %v, submitted %v", k, order, want)
						}
					}
				}
			})
		}
	}
}

// In a sync batch with dependencies, a key's operations still start in
// submission order: one ready at once waits for the one before it of its
// key, which waits for its dependency.
func TestKeyOrderWithDependencies(t *testing.T) {
	t.Parallel()
	r := newKeyRig(t, 1, "aab-")
	// a0 depends on b2, held; a1 depends on nothing, but comes after a0.
	b, err := parseBatch(context.Background(), []byte(`{"mode":"parallel","batch":[
		{"id":"a0","path":"/a/0","key":"a","depends_on":["b2"]},
		{"id":"a1","path":"/a/1","key":"a"},
		{"id":"b2","path":"/b/2","key":"b"},
		{"id":"x3","path":"/-/3"}]}`), &r.h.rules)
	if err != nil {
		t.Fatal(err)
	}
	r.b = b
	r.held[2] = true
	finished := make(chan struct{})
	go func() { defer close(finished); r.runBatch() }()
	eventually(t, 10*time.Second, "the operation without a key to end", func() bool { return r.hasEnded(3) && r.started(2) })
	if r.started(0) || r.started(1) {
		t.Errorf("key a started %v before its dependency ended", r.start)
	}
	close(r.hold)
	receive(t, 10*time.Second, "the batch to end", finished)
	if i, j := slices.Index(r.start, 0), slices.Index(r.start, 1); i < 0 || j < i {
		t.Errorf("started %v: a1 went before a0", r.start)
	}
}

// A key whose operations wait behind a slow one of its own fills the
// job's window and no more: the stream reads on past them while the
// window has room, so other keys' operations in it run, and never reads
// beyond it until the slow one ends.
func TestKeyWindowLimit(t *testing.T) {
	t.Parallel()
	const n = streamWindow + 200
	keys := []byte(strings.Repeat("a", n))
	for i := 1000; i < 1100; i++ {
		keys[i] = 'b' // inside the window
	}
	for i := streamWindow; i < n; i++ {
		keys[i] = 'c' // past it
	}
	r := newKeyRig(t, 1, string(keys), 0)
	var released atomic.Bool
	var read atomic.Int64
	src := &sliceSource{ops: r.b.ops, check: func(i int) {
		read.Store(int64(i + 1))
		if i >= streamWindow && !released.Load() {
			t.Errorf("operation %d read while operation 0, %[1]d before it, had not ended", i)
		}
	}}
	finished := make(chan struct{})
	go func() { defer close(finished); r.runJob(src) }()
	b := r.opsOf(string(keys), 'b')
	eventually(t, 10*time.Second, "the window to fill, and the other key in it to run", func() bool {
		return read.Load() == streamWindow && r.hasEnded(b...)
	})
	if r.started(1) || r.started(streamWindow-1) {
		t.Error("operations of the held key started")
	}
	released.Store(true)
	close(r.hold)
	receive(t, 20*time.Second, "the job to end", finished)
	if len(r.got) != n || r.most["a"] != 1 || r.most["c"] != 1 {
		t.Errorf("%d results of %d; at most %d of key a at once, %d of c", len(r.got), n, r.most["a"], r.most["c"])
	}
}

// keyedBackend answers /k/KEY/SEQ, after a short wait or, with ?hold,
// once released, counting for each key what it holds at once and whether
// its operations arrive in SEQ order: its own count, not the batch's.
type keyedBackend struct {
	*httptest.Server
	mu       sync.Mutex
	inFlight map[string]int
	most     map[string]int
	last     map[string]int
	disorder []string
	started  map[string]int
	hold     chan struct{}
}

func newKeyedBackend(t *testing.T) *keyedBackend {
	t.Helper()
	kb := &keyedBackend{inFlight: map[string]int{}, most: map[string]int{}, last: map[string]int{}, started: map[string]int{}, hold: make(chan struct{})}
	kb.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rest, ok := strings.CutPrefix(r.URL.Path, "/k/")
		key, s, _ := strings.Cut(rest, "/")
		seq, err := strconv.Atoi(s)
		if !ok || err != nil {
			http.NotFound(w, r)
			return
		}
		kb.mu.Lock()
		kb.inFlight[key]++
		kb.most[key] = max(kb.most[key], kb.inFlight[key])
		if last, seen := kb.last[key]; seen && seq <= last {
			kb.disorder = append(kb.disorder, fmt.Sprintf("key %s: %d after %d", key, seq, last))
		}
		kb.last[key] = seq
		kb.started[key]++
		hold := kb.hold
		kb.mu.Unlock()
		if r.URL.Query().Has("hold") {
			select {
			case <-hold:
			case <-r.Context().Done():
			}
		} else {
			time.Sleep(2 * time.Millisecond)
		}
		// Counted out before the answer goes: the next operation of the
		// key is sent only once it has arrived.
		kb.mu.Lock()
		kb.inFlight[key]--
		kb.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"key":%q,"seq":%d}`, key, seq)
	}))
	t.Cleanup(kb.Close)
	return kb
}

func (kb *keyedBackend) addr() string { return strings.TrimPrefix(kb.URL, "http://") }

// check fails the test if a key had more than limit operations at the
// backend at once, or, at limit 1, its operations arrived out of order.
func (kb *keyedBackend) check(t *testing.T, limit int) {
	t.Helper()
	kb.mu.Lock()
	defer kb.mu.Unlock()
	for k, most := range kb.most {
		if most > limit {
			t.Errorf("key %s: %d operations at the backend at once, key_concurrency %d", k, most, limit)
		}
	}
	if limit == 1 && len(kb.disorder) > 0 {
		t.Errorf("%d operations arrived before an earlier one of their key, first %s", len(kb.disorder), kb.disorder[0])
	}
}

// keyedOps returns n accounts spread at random over keys accounts (the
// same each run), and each one's sequence number in its account.
func keyedOps(n, keys int) (account, seq []int) {
	rng := rand.New(rand.NewPCG(24, 2))
	count := make([]int, keys)
	for range n {
		a := rng.IntN(keys)
		account, seq = append(account, a), append(seq, count[a])
		count[a]++
	}
	return account, seq
}

// Issue #24's test, in a sync batch: 1,000 operations over 50 keys at
// concurrency 20 never have two of one key at the backend at once, each
// key's arrive in order, and the results come back in submission order;
// as operations with a key, and as a bulk batch whose key is an item
// template.
func TestKeysInSyncBatch(t *testing.T) {
	kb := newKeyedBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode parallel
		concurrency 20
		max_ops 1000
	}
	reverse_proxy %s`, kb.addr()))
	account, seq := keyedOps(1000, 50)
	var ops, items []string
	for i := range account {
		ops = append(ops, fmt.Sprintf(`{"path":"/k/acct-%d/%d","key":"acct-%d"}`, account[i], seq[i], account[i]))
		items = append(items, fmt.Sprintf(`{"account_id":"acct-%d","seq":%d}`, account[i], seq[i]))
	}
	for name, body := range map[string]string{
		"operations": `[` + strings.Join(ops, ",") + `]`,
		"bulk":       `{"operation":{"path":"/k/{{item.account_id}}/{{item.seq}}","key":"{{item.account_id}}"},"items":[` + strings.Join(items, ",") + `]}`,
	} {
		t.Run(name, func(t *testing.T) {
			kb.mu.Lock()
			clear(kb.most)
			clear(kb.last)
			kb.mu.Unlock()
			status, _, out := send(t, "POST", base+"/batch", body)
			if status != 200 {
				t.Fatalf("%d %.300s", status, out)
			}
			res := mustJSON(t, out)
			if name == "bulk" {
				res = res.Get("results")
			}
			results := res.Array()
			if len(results) != 1000 {
				t.Fatalf("%d results", len(results))
			}
			for i, r := range results {
				if r.Get("status").Int() != 200 || r.Get("body.seq").Int() != int64(seq[i]) || r.Get("body.key").String() != fmt.Sprintf("acct-%d", account[i]) {
					t.Fatalf("result %d out of place: %s", i, r.Raw)
				}
			}
			kb.check(t, 1)
		})
	}
}

// The same in a streamed job of three chunks, a CSV import whose key is
// an item template: a key's operations in a later chunk never overtake
// its earlier ones. An NDJSON job with key_concurrency 2 on its options
// line lets two of a key run at once, and no more.
func TestKeysInStreamedJob(t *testing.T) {
	kb := newKeyedBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch /batch/* {
		mode parallel
		concurrency 20
		async
	}
	reverse_proxy %s`, kb.addr()))
	const n = 2*opsPerChunk + 500
	account, seq := keyedOps(n, 50)
	var csv strings.Builder
	csv.WriteString("account_id,seq\n")
	for i := range account {
		fmt.Fprintf(&csv, "acct-%d,%d\n", account[i], seq[i])
	}
	status, _, body := send(t, "POST", base+"/batch?method=GET&path=/k/{{item.account_id}}/{{item.seq}}&key={{item.account_id}}",
		csv.String(), "Content-Type: text/csv", alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	job := base + "/batch/" + mustJSON(t, body).Get("id").String()
	if p := waitJob(t, job, alice, "completed"); p.Get("succeeded").Int() != n {
		t.Fatalf("job: %s", p.Raw)
	}
	kb.check(t, 1)
	_, _, body = send(t, "GET", job+"/results", "", alice, "Accept: application/x-ndjson")
	lines := strings.Split(strings.TrimSpace(body), "\n")
	if len(lines) != n+1 {
		t.Fatalf("%d result lines for %d operations", len(lines), n)
	}
	for i, line := range lines[:n] {
		if r := mustJSON(t, line); r.Get("id").String() != strconv.Itoa(i) || r.Get("body.seq").Int() != int64(seq[i]) {
			t.Fatalf("result %d out of place: %s", i, line)
		}
	}

	// key_concurrency 2, on an NDJSON options line or in the query: two
	// of a key at once, 40 of each in a row.
	for name, where := range map[string]string{"options line": `{"key_concurrency":2}` + "\n", "query": "?key_concurrency=2"} {
		kb.mu.Lock()
		clear(kb.most)
		kb.mu.Unlock()
		var ops []string
		for i := range 2 * opsPerChunk {
			ops = append(ops, fmt.Sprintf(`{"path":"/k/acct-%d/%d","key":"acct-%d"}`, i/40, i%40, i/40))
		}
		body, query := strings.Join(ops, "\n"), ""
		if strings.HasPrefix(where, "?") {
			query = where
		} else {
			body = where + body
		}
		status, body = sendNDJSON(t, base+"/batch"+query, body)
		if status != 202 {
			t.Fatalf("%s: %d %s", name, status, body)
		}
		job = base + "/batch/" + mustJSON(t, body).Get("id").String()
		if p := waitJob(t, job, alice, "completed"); p.Get("succeeded").Int() != 2*opsPerChunk {
			t.Fatalf("%s: job: %s", name, p.Raw)
		}
		kb.check(t, 2)
		kb.mu.Lock()
		if most := slices.Max(slices.Collect(maps.Values(kb.most))); most != 2 {
			t.Errorf("%s: at most %d operations of a key at once, key_concurrency 2", name, most)
		}
		kb.mu.Unlock()
	}
}

// key_concurrency 2 in the config lets two operations of a key run at
// once and holds the third, while another key's run on; the batch field
// overrides it.
func TestKeyConcurrencyThroughCaddy(t *testing.T) {
	kb := newKeyedBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode parallel
		concurrency 8
		key_concurrency 2
	}
	reverse_proxy %s`, kb.addr()))
	ops := `{"path":"/k/a/0?hold","key":"a"},{"path":"/k/a/1?hold","key":"a"},{"path":"/k/a/2?hold","key":"a"},{"path":"/k/b/0","key":"b"},{"path":"/k/b/1","key":"b"}`
	for _, tc := range []struct {
		body    string
		running int
	}{
		{`[` + ops + `]`, 2},
		{`{"key_concurrency":1,"batch":[` + ops + `]}`, 1},
	} {
		kb.mu.Lock()
		clear(kb.most)
		clear(kb.started)
		kb.hold = make(chan struct{})
		hold := kb.hold
		kb.mu.Unlock()
		answered := make(chan string, 1)
		req := request(t, "POST", base+"/batch", tc.body)
		go func() {
			resp, err := client.Do(req)
			if err != nil {
				answered <- err.Error()
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			answered <- fmt.Sprint(resp.StatusCode, " ", string(body))
		}()
		eventually(t, 10*time.Second, "key b's operations to end while a's are held", func() bool {
			kb.mu.Lock()
			defer kb.mu.Unlock()
			return kb.started["a"] >= tc.running && kb.started["b"] == 2 && kb.inFlight["b"] == 0
		})
		kb.mu.Lock()
		if kb.started["a"] != tc.running {
			t.Errorf("%s: %d of key a started while the first were held", tc.body, kb.started["a"])
		}
		kb.mu.Unlock()
		close(hold)
		out := receive(t, 10*time.Second, "the batch's answer", answered)
		if !strings.HasPrefix(out, "200 ") || strings.Count(out, `"status":200`) != 5 {
			t.Errorf("answer: %s", out)
		}
		kb.mu.Lock()
		if kb.most["a"] != tc.running {
			t.Errorf("%s: at most %d of key a at once, want %d", tc.body, kb.most["a"], tc.running)
		}
		kb.mu.Unlock()
	}
}
