package batch

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// The benchmarks run the handler directly, downstream a trivial handler
// answering ~100 bytes of JSON, so that they measure the module's own cost.
// Compare per-operation figures (ns/item, allocs/item) of BenchmarkBatch
// with BenchmarkDirect (the work itself) and BenchmarkFloor (the least any
// correct sub-request costs in Caddy), from the same run; BenchmarkRatio
// measures the time ratios with the three taking turns:
//
//	go test -run '^$' -bench . -benchmem

var benchAnswer = []byte(`{"id":42,"name":"Alice Example","email":"alice@example.com","balance":1234,"tags":["a","b"]}`)

func benchDownstream() caddyhttp.Handler {
	return caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.Header().Set("Content-Type", "application/json")
		_, err := w.Write(benchAnswer)
		return err
	})
}

// discard is a ResponseWriter that keeps nothing but the status.
type discard struct {
	h      http.Header
	status int
}

func (w *discard) Header() http.Header         { return w.h }
func (w *discard) Write(p []byte) (int, error) { return len(p), nil }
func (w *discard) WriteHeader(code int)        { w.status = code }

func benchHandler(b *testing.B, mode string) *Handler {
	b.Helper()
	h := provision(b, &Handler{Mode: mode, MaxOps: 20000, MaxBodySize: 64 << 20})
	h.logger = zap.NewNop()
	return h
}

func benchBatch(n int) []byte {
	var sb strings.Builder
	sb.WriteByte('[')
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"path":"/users/%d"}`, i)
	}
	sb.WriteByte(']')
	return []byte(sb.String())
}

// perItem reports ns and allocations per operation for n operations per
// iteration.
func perItem(b *testing.B, n int, run func()) {
	b.Helper()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	iters := 0
	for b.Loop() {
		run()
		iters++
	}
	elapsed := time.Since(start)
	runtime.ReadMemStats(&after)
	items := float64(iters * n)
	b.ReportMetric(float64(elapsed.Nanoseconds())/items, "ns/item")
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/items, "allocs/item")
}

// BenchmarkDirect calls the downstream handler with ready-made requests.
func BenchmarkDirect(b *testing.B) {
	next := benchDownstream()
	reqs := make([]*http.Request, 100)
	for i := range reqs {
		reqs[i] = httptest.NewRequest(http.MethodGet, fmt.Sprintf("/users/%d", i), nil)
	}
	b.ReportAllocs()
	perItem(b, len(reqs), func() {
		for _, r := range reqs {
			_ = next.ServeHTTP(&discard{h: http.Header{}}, r)
		}
	})
}

// floorOp builds and serves one sub-request as any correct one must be
// built: a fresh request and header map, PrepareRequest with a new
// replacer.
func floorOp(next caddyhttp.Handler) func() {
	srv := &caddyhttp.Server{}
	u, _ := url.Parse("/users/1")
	return func() {
		w := &discard{h: http.Header{}}
		req := (&http.Request{Method: http.MethodGet, URL: u, Header: make(http.Header), Body: http.NoBody, Host: "example.com"}).WithContext(context.Background())
		req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), w, srv)
		_ = next.ServeHTTP(w, req)
	}
}

// batchOp serves one batch of n GETs through a handler in mode.
func batchOp(b *testing.B, mode string, n int, next caddyhttp.Handler) func() {
	h := benchHandler(b, mode)
	body := benchBatch(n)
	srv := &caddyhttp.Server{}
	return func() {
		w := &discard{h: http.Header{}}
		req := httptest.NewRequest(http.MethodPost, "/batch", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), w, srv)
		if err := h.ServeHTTP(w, req, next); err != nil || w.status != http.StatusOK {
			b.Fatal(w.status, err) // a benchmark of a refusal measures nothing
		}
	}
}

// BenchmarkFloor serves sub-requests built as floorOp builds them.
func BenchmarkFloor(b *testing.B) {
	op := floorOp(benchDownstream())
	b.ReportAllocs()
	perItem(b, 1, op)
}

// BenchmarkBatch runs n GETs as one batch through the handler.
func BenchmarkBatch(b *testing.B) {
	for _, mode := range []string{modeSequential, modeParallel} {
		for _, n := range []int{1, 10, 100, 1000} {
			b.Run(fmt.Sprintf("%s/%d", mode, n), func(b *testing.B) {
				run := batchOp(b, mode, n, benchDownstream())
				b.ReportAllocs()
				perItem(b, n, run)
			})
		}
	}
}

// BenchmarkRatio reports the time of a batch of 100 over that of the same
// 100 operations served as BenchmarkFloor serves them (x-floor) and as
// BenchmarkDirect does (x-direct), taking turns within each iteration: on
// a shared machine whose speed drifts, the ratio of separate benchmarks
// moves by ±20%, this one does not.
func BenchmarkRatio(b *testing.B) {
	const n = 100
	for _, mode := range []string{modeSequential, modeParallel} {
		b.Run(mode, func(b *testing.B) {
			next := benchDownstream()
			run, floor := batchOp(b, mode, n, next), floorOp(next)
			reqs := make([]*http.Request, n)
			for i := range reqs {
				reqs[i] = httptest.NewRequest(http.MethodGet, fmt.Sprintf("/users/%d", i), nil)
			}
			var tBatch, tFloor, tDirect time.Duration
			for b.Loop() {
				t0 := time.Now()
				run()
				t1 := time.Now()
				for range n {
					floor()
				}
				t2 := time.Now()
				for _, r := range reqs {
					_ = next.ServeHTTP(&discard{h: http.Header{}}, r)
				}
				t3 := time.Now()
				tBatch, tFloor, tDirect = tBatch+t1.Sub(t0), tFloor+t2.Sub(t1), tDirect+t3.Sub(t2)
			}
			b.ReportMetric(float64(tBatch)/float64(tFloor), "x-floor")
			b.ReportMetric(float64(tBatch)/float64(tDirect), "x-direct")
			b.ReportMetric(0, "ns/op") // the iteration mixes three things
		})
	}
}

// BenchmarkParse parses and validates a batch of n operations.
func BenchmarkParse(b *testing.B) {
	for _, n := range []int{10, 100, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			h := benchHandler(b, modeSequential)
			body := benchBatch(n)
			b.ReportAllocs()
			perItem(b, n, func() {
				if _, err := parseBatch(context.Background(), body, &h.rules); err != nil {
					b.Fatal(err)
				}
			})
		})
	}
}

// BenchmarkBatchLarge reports the peak heap growth of large sequential
// batches: results stream out, so it must not grow with n.
func BenchmarkBatchLarge(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			run := batchOp(b, modeSequential, n, benchDownstream())
			runtime.GC()
			var base runtime.MemStats
			runtime.ReadMemStats(&base)
			peak := base.HeapInuse
			stop := make(chan struct{})
			done := make(chan struct{})
			go func() {
				defer close(done)
				var m runtime.MemStats
				for {
					select {
					case <-stop:
						return
					case <-time.After(2 * time.Millisecond):
						runtime.ReadMemStats(&m)
						peak = max(peak, m.HeapInuse)
					}
				}
			}()
			perItem(b, n, run)
			close(stop)
			<-done
			b.ReportMetric(float64(peak-base.HeapInuse)/(1<<20), "peak-heap-MiB")
		})
	}
}

// adversarialBodies are batches of about size bytes each built to make a
// validator work hard: what a quadratic step, an unbounded echo or a deep
// walk would turn into seconds of CPU or a crash.
func adversarialBodies(size int) map[string][]byte {
	fill := func(prefix, unit, suffix string) []byte {
		n := max((size-len(prefix)-len(suffix))/len(unit), 1)
		return []byte(prefix + strings.Repeat(unit, n) + suffix)
	}
	ops := func(op string) []byte { return fill("[", op+",", op+"]") }
	ids := func(n int) string {
		var sb strings.Builder
		for i := range n {
			if i > 0 {
				sb.WriteByte(',')
			}
			fmt.Fprintf(&sb, `"%d"`, i)
		}
		return sb.String()
	}
	nOps := size / 40
	var cycles strings.Builder
	cycles.WriteString(`{"mode":"parallel","batch":[`)
	for i := 0; i < nOps; i += 2 { // pairs that depend on each other
		if i > 0 {
			cycles.WriteByte(',')
		}
		fmt.Fprintf(&cycles, `{"id":"a%d","depends_on":"b%d"},{"id":"b%d","depends_on":"a%d"}`, i, i, i, i)
	}
	cycles.WriteString(`]}`)
	return map[string][]byte{
		"plain":            ops(`{"path":"/users/123"}`),
		"nested-encodings": fill(`[{"path":"/x/%25`, "25", `"}]`),
		"brace-runs":       fill(`[{"path":"/a","body":"`, "{{", `}}"}]`),
		"unclosed-refs":    fill(`[{"id":"a","path":"/a"},{"path":"/b","body":"`, "{{a.", `}}"}]`),
		"many-references":  fill(`[{"id":"a","path":"/a"},{"path":"/b","body":"`, "{{a.status}}", `"}]`),
		"long-ids":         ops(`{"id":"` + strings.Repeat("i", 200) + `!","path":"/a"}`),
		"long-invalid-id":  fill(`[{"path":"/a","id":"`, "!", `"}]`),
		"many-faults":      ops(`{"path":"http://x/","method":"TRACE","x":1,"y":2,"headers":{"Host":"h"}}`),
		"unknown-fields":   fill(`[{"path":"/a"`, `,"xxxxxxxxxxxx":0`, `}]`),
		"many-headers":     fill(`[{"path":"/a","headers":{"X-0":"v"`, `,"X-Aaaaaaaa":"v"`, `}}]`),
		"deep-nesting":     fill("", "[", ""),
		"deep-allowed":     fill("[", `{"path":"/a","body":`+strings.Repeat("[", 60)+strings.Repeat("]", 60)+"},", `{"path":"/a"}]`),
		"long-depends-on":  []byte(`{"mode":"parallel","batch":[` + strings.Repeat(`{"path":"/a"},`, nOps/4) + `{"path":"/b","depends_on":[` + ids(nOps/4) + `]}]}`),
		"many-cycles":      []byte(cycles.String()),
	}
}

// BenchmarkAdversarial parses and validates adversarial bodies of
// max_body_size (10 MiB) with max_ops at 1,000,000, and reports each as a
// ratio to a plain batch of the same size parsed in the same run.
func BenchmarkAdversarial(b *testing.B) {
	h := &Handler{MaxOps: 1_000_000, MaxBodySize: defaultMaxSize}
	provision(b, h)
	bodies := adversarialBodies(defaultMaxSize)
	parse := func(body []byte) time.Duration {
		start := time.Now()
		_, _ = parseBatch(context.Background(), body, &h.rules)
		return time.Since(start)
	}
	names := make([]string, 0, len(bodies))
	for name := range bodies {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		b.Run(name, func(b *testing.B) {
			var took, plain time.Duration
			for b.Loop() {
				plain += parse(bodies["plain"])
				took += parse(bodies[name])
			}
			b.ReportMetric(float64(took)/float64(b.N)/1e6, "ms/parse")
			b.ReportMetric(float64(took)/float64(plain), "x-plain")
			b.ReportMetric(0, "ns/op") // the iteration parses two bodies
		})
	}
}
