package batch

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
)

// max_inflight bounds the operations in flight downstream across all the
// batches of a handler, and every operation still succeeds: they wait.
func TestMaxInflightBoundsAllBatches(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 10
		max_inflight 4
	}`))
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=op%d&d=10ms"}`, i))
	}
	body := `{"batch":[` + strings.Join(ops, ",") + `]}`
	var wg sync.WaitGroup
	var ok atomic.Int64
	for range 8 {
		wg.Go(func() {
			status, _, resp := send(t, "POST", base+"/batch", body)
			if status != 200 {
				t.Errorf("batch: %d %s", status, resp)
				return
			}
			for _, r := range mustJSON(t, resp).Get("results").Array() {
				if r.Get("status").Int() == 200 {
					ok.Add(1)
				} else {
					t.Errorf("operation: %s", r.Raw)
				}
			}
		})
	}
	waitGroup(t, 40*time.Second, "the eight batches to be answered", &wg)
	be.mu.Lock()
	maxIn := be.maxInFlight
	be.mu.Unlock()
	if ok.Load() != 8*20 {
		t.Errorf("%d of %d operations succeeded", ok.Load(), 8*20)
	}
	if maxIn > 4 {
		t.Errorf("%d operations in flight at once, max_inflight 4", maxIn)
	}
}

// An async job's operations, of any method, answered 429 with
// Retry-After: all operations pause for it, the refused one is sent again
// after it, and the job ends with every operation 200.
func TestPacingPausesOnRetryAfter(t *testing.T) {
	for _, c := range []struct{ name, block, header string }{
		{"async job", "async {\n\t\t\tretention 1h\n\t\t}", "Prefer: respond-async"},
		{"sync adaptive", "pacing adaptive", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			var limitedAt atomic.Int64 // UnixNano of the 429
			var calls atomic.Int64
			be := newRecorder(t, func(w http.ResponseWriter, r *http.Request) bool {
				n := calls.Add(1)
				if n == 1 {
					w.Header().Set("Retry-After", "1")
					w.WriteHeader(http.StatusTooManyRequests)
					limitedAt.Store(time.Now().UnixNano())
					return true
				}
				if n <= 3 {
					// Those sent with it answer once the 429 is known.
					time.Sleep(300 * time.Millisecond)
				}
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprintf(w, `{"n":%d}`, n)
				return true
			})
			base := startCaddy(t, fmt.Sprintf(`
	metrics /metrics
	batch /batch /batch/* {
		mode parallel
		concurrency 3
		op_timeout 10s
		%s
	}
	reverse_proxy %s`, c.block, be.addr()))
			var ops []string
			for i := range 4 {
				ops = append(ops, fmt.Sprintf(`{"id":"p%d","method":"POST","path":"/items","body":{"i":%d}}`, i, i))
			}
			body := `{"batch":[` + strings.Join(ops, ",") + `]}`
			var results string
			if c.header != "" {
				id := submitJob(t, base+"/batch", body)
				waitJob(t, base+"/batch/"+id, alice, "completed", "error")
				_, _, results = send(t, "GET", base+"/batch/"+id+"/results", "", alice)
			} else {
				_, _, results = send(t, "POST", base+"/batch", body)
			}
			res := mustJSON(t, results).Get("results").Array()
			retried := 0
			for _, r := range res {
				if r.Get("status").Int() != 200 {
					t.Errorf("operation: %s", r.Raw)
				}
				if r.Get("attempts").Int() == 2 {
					retried++
				}
			}
			if len(res) != 4 || retried != 1 {
				t.Errorf("%d results, %d retried once, want 4 and 1: %s", len(res), retried, results)
			}
			reqs := be.requests()
			if len(reqs) != 5 {
				t.Fatalf("backend saw %d requests, want 5 (4 and a retry)", len(reqs))
			}
			// Counted: one pause, and a wait for a turn per try.
			_, _, m := send(t, "GET", base+"/metrics", "")
			for _, want := range []string{`caddy_batch_pacing_events_total{event="paused"} 1`, `caddy_batch_turn_wait_seconds_count 5`} {
				if !strings.Contains(m, want+"\n") {
					t.Errorf("metrics lack %q", want)
				}
			}
			pauseEnd := time.Unix(0, limitedAt.Load()).Add(time.Second)
			// The first three went out together; none after them before
			// the pause ended.
			for i, r := range reqs[3:] {
				if r.At.Before(pauseEnd) {
					t.Errorf("request %d arrived %s before the pause ended", i+3, pauseEnd.Sub(r.At))
				}
			}
		})
	}
}

// A backend that advertises its quota in RateLimit headers is paced
// within it: the quota left is spread over the time to its reset, and
// none of the operations is refused.
func TestPacingSpreadsAdvertisedQuota(t *testing.T) {
	const quota, window = 5, time.Second
	// One handler per form, each with its own pacer and backend: the
	// forms run at once, in one Caddy.
	forms := []string{"structured", "legacy", "x-ratelimit"}
	backends := map[string]*recorder{}
	refused := map[string]*atomic.Int64{}
	var site strings.Builder
	for _, form := range forms {
		var mu sync.Mutex
		var start time.Time
		used := map[int]int{}
		limited := new(atomic.Int64)
		refused[form] = limited
		backends[form] = newRecorder(t, func(w http.ResponseWriter, r *http.Request) bool {
			at := time.Now()
			mu.Lock()
			if start.IsZero() {
				start = at
			}
			k := int(at.Sub(start) / window)
			used[k]++
			left := quota - used[k]
			mu.Unlock()
			end := start.Add(time.Duration(k+1) * window)
			reset := max(1, int(math.Ceil(end.Sub(at).Seconds())))
			if left < 0 {
				limited.Add(1)
				w.Header().Set("Retry-After", strconv.Itoa(reset))
				w.WriteHeader(http.StatusTooManyRequests)
				return true
			}
			switch form {
			case "structured":
				w.Header().Set("RateLimit", fmt.Sprintf(`"default";r=%d;t=%d`, left, reset))
				w.Header().Set("RateLimit-Policy", fmt.Sprintf(`"default";q=%d;w=1`, quota))
			case "legacy":
				w.Header().Set("RateLimit-Limit", strconv.Itoa(quota))
				w.Header().Set("RateLimit-Remaining", strconv.Itoa(left))
				w.Header().Set("RateLimit-Reset", strconv.Itoa(reset))
			default:
				w.Header().Set("X-RateLimit-Limit", strconv.Itoa(quota))
				w.Header().Set("X-RateLimit-Remaining", strconv.Itoa(left))
				w.Header().Set("X-RateLimit-Reset", strconv.FormatInt(end.Unix()+1, 10)) // a Unix time, rounded up
			}
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"left":%d}`, left)
			return true
		})
		fmt.Fprintf(&site, `
	handle /%s/* {
		batch /%s/batch {
			op_timeout 10s
			pacing adaptive
		}
		reverse_proxy %s
	}`, form, form, backends[form].addr())
	}
	base := startCaddy(t, site.String())
	var ops []string
	for i := range 10 {
		ops = append(ops, fmt.Sprintf(`{"path":"/items/%d"}`, i))
	}
	for _, form := range forms {
		t.Run(form, func(t *testing.T) {
			t.Parallel()
			began := time.Now()
			_, _, body := send(t, "POST", base+"/"+form+"/batch", `{"batch":[`+strings.Join(ops, ",")+`]}`)
			took := time.Since(began)
			for _, r := range mustJSON(t, body).Get("results").Array() {
				if r.Get("status").Int() != 200 {
					t.Errorf("operation: %s", r.Raw)
				}
			}
			if n := refused[form].Load(); n != 0 {
				t.Errorf("%d operations were refused 429: the quota was not paced", n)
			}
			if reqs := backends[form].requests(); len(reqs) != 10 {
				t.Errorf("backend saw %d requests, want 10", len(reqs))
			}
			// 10 operations at 5 per window need two windows.
			if took < window {
				t.Errorf("10 operations in %s, at 5 per %s", took, window)
			}
		})
	}
}

// rate makes operations wait for their tokens; one whose token comes
// after its op_timeout is answered 504, saying why.
func TestRateWaits(t *testing.T) {
	be := newRecorder(t, func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusNoContent)
		return true
	})
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode parallel
		rate 5 500ms
	}
	reverse_proxy %s`, be.addr()))
	ops := strings.TrimSuffix(strings.Repeat(`{"path":"/x"},`, 10), ",")
	began := time.Now()
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[`+ops+`]}`)
	took := time.Since(began)
	for _, r := range mustJSON(t, body).Get("results").Array() {
		if r.Get("status").Int() != 204 {
			t.Errorf("operation: %s", r.Raw)
		}
	}
	// A burst of 5, then 5 more at one per 100ms.
	if took < 450*time.Millisecond {
		t.Errorf("10 operations in %s at rate 5 per 500ms", took)
	}

	base = startCaddy(t, fmt.Sprintf(`
	batch /batch {
		op_timeout 300ms
		rate 1 1h
	}
	reverse_proxy %s`, be.addr()))
	_, _, body = send(t, "POST", base+"/batch", `{"batch":[{"path":"/x"},{"path":"/x"}]}`)
	res := mustJSON(t, body)
	if res.Get("results.0.status").Int() != 204 || res.Get("results.1.status").Int() != 504 ||
		!strings.Contains(res.Get("results.1.error").String(), "waiting to be sent downstream") {
		t.Errorf("second operation of rate 1 per hour: %s", body)
	}
}

// A keyed rate gives each key its own bucket, resolved from the batch
// request: one tenant's batch does not spend another's tokens.
func TestRateKeyedByPlaceholder(t *testing.T) {
	be := newRecorder(t, func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusNoContent)
		return true
	})
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		op_timeout 300ms
		rate 2 1h {http.request.header.X-Tenant}
	}
	reverse_proxy %s`, be.addr()))
	ops := `{"batch":[{"path":"/x"},{"path":"/x"},{"path":"/x"}]}`
	want := []int64{204, 204, 504}
	for _, tenant := range []string{"a", "b"} {
		_, _, body := send(t, "POST", base+"/batch", ops, "X-Tenant: "+tenant)
		for i, r := range mustJSON(t, body).Get("results").Array() {
			if r.Get("status").Int() != want[i] {
				t.Errorf("tenant %s op %d: %s", tenant, i, r.Raw)
			}
		}
	}
}

// Pacing is learned per caller and API: one caller whose operations are
// refused for a minute slows no other caller's job or batch.
func TestPacingPerCaller(t *testing.T) {
	setVar(t, &jobsGrace, 100*time.Millisecond) // alice's job is cut off at the end
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		pacing adaptive
		op_timeout 3s
		async {
			retention 1h
		}
	}`))
	var ops []string
	for i := range 5 {
		ops = append(ops, fmt.Sprintf(`{"path":"/limited?id=a%d&n=1000&after=60"}`, i))
	}
	refused := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]") // alice's: paused for a minute
	eventually(t, 10*time.Second, "alice's operations refused", func() bool {
		be.mu.Lock()
		defer be.mu.Unlock()
		return be.limited["a0"] > 0
	})
	bob := "Authorization: Bearer bob"
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"},{"path":"/health"}]`, bob, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("bob's job: %d %s", status, body)
	}
	p := waitJob(t, base+"/batch/"+mustJSON(t, body).Get("id").String(), bob, "completed", "error")
	if p.Get("succeeded").Int() != 2 {
		t.Errorf("bob's job while alice's is paused: %s", p.Raw)
	}
	status, _, body = send(t, "POST", base+"/batch", `{"batch":[{"path":"/health"},{"path":"/health"}]}`, bob)
	if status != 200 || mustJSON(t, body).Get("succeeded").Int() != 2 {
		t.Errorf("bob's batch while alice's job is paused: %d %s", status, body)
	}
	// Alice's own operations are still held back.
	if p := mustJSON(t, func() string { _, _, b := send(t, "GET", base+"/batch/"+refused, "", alice); return b }()); p.Get("succeeded").Int() != 0 {
		t.Errorf("alice's refused job: %s", p.Raw)
	}
}

// op_timeout bounds an operation in flight: a job's operation that waits
// longer than that for its turn is sent when its turn comes, never
// answered 504 unsent; a sync batch's wait stays within op_timeout.
func TestJobWaitsForItsTurnPastOpTimeout(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 4
		max_inflight 1
		op_timeout 1s
		async {
			retention 1h
		}
	}`))
	ops := `[{"path":"/slow?d=700ms&id=a"},{"path":"/slow?d=700ms&id=b"},{"path":"/health"}]`
	p := waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", ops), alice, "completed")
	if p.Get("succeeded").Int() != 3 {
		t.Errorf("a job whose operations wait past op_timeout for a turn: %s", p.Raw)
	}
	_, _, body := send(t, "POST", base+"/batch", `{"batch":`+ops+`}`)
	if res := mustJSON(t, body); res.Get("failed").Int() == 0 {
		t.Errorf("a sync batch's operation, its wait for a turn included, takes at most op_timeout: %s", body)
	}
}

func TestRetry429(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		retry_429 2
	}`))
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[
		{"path":"/limited?id=a&n=2&after=0"},
		{"path":"/limited?id=b&n=5&after=0"},
		{"method":"POST","path":"/limited?id=c&n=1&after=7"},
		{"path":"/limited?id=d&n=9&after=3600"}]}`)
	res := mustJSON(t, body)
	checks := []struct {
		status, attempts int64
	}{{200, 3}, {429, 3}, {429, 0}, {429, 0}}
	for i, c := range checks {
		r := res.Get(fmt.Sprintf("results.%d", i))
		if r.Get("status").Int() != c.status || r.Get("attempts").Int() != c.attempts {
			t.Errorf("op %d: %s, want status %d attempts %d", i, r.Raw, c.status, c.attempts)
		}
	}
	if got := res.Get("results.2.headers.Retry-After").String(); got != "7" {
		t.Errorf("a 429 keeps its Retry-After: %q", got)
	}
	// d's Retry-After (1h) is beyond op_timeout: it is not waited for.
	if got := res.Get("retry_after").Int(); got != 3600 {
		t.Errorf("envelope retry_after = %d, want the largest, 3600: %s", got, body)
	}
	be.mu.Lock()
	n := be.limited["c"]
	be.mu.Unlock()
	if n != 1 {
		t.Errorf("POST is not idempotent: sent %d times", n)
	}
}

// A retry starts from the operation as written, not from the request a
// handler rewrote on the first try.
func TestRetry429AfterRewrite(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		retry_429 1
	}
	handle /api/* {
		uri strip_prefix /api
		reverse_proxy %s
	}
	handle {
		respond "not under /api" 404
	}`, be.addr()))
	_, _, body := send(t, "POST", base+"/batch", `[{"path":"/api/limited?id=r&n=1&after=0"}]`)
	r := mustJSON(t, body).Get("0")
	if r.Get("status").Int() != 200 || r.Get("attempts").Int() != 2 || r.Get("body.calls").Int() != 2 {
		t.Errorf("retried after a rewrite: %s", r.Raw)
	}
}

// Retry-After values past what a Duration holds, or unreadable, neither
// make retries immediate nor wrap around: a wait is capped, and an
// unreadable one is the documented second.
func TestRetryAfterOutOfRange(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		retry_429 2
		op_timeout 900ms
	}`))
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[
		{"path":"/limited?id=big&n=9&after=9223372037"},
		{"path":"/limited?id=wrap&n=9&after=18446744074"},
		{"path":"/limited?id=soon&n=9&after=soon"}]}`)
	res := mustJSON(t, body)
	be.mu.Lock()
	calls := map[string]int{"big": be.limited["big"], "wrap": be.limited["wrap"], "soon": be.limited["soon"]}
	be.mu.Unlock()
	for id, n := range calls {
		// Each wait is longer than op_timeout leaves: no retry.
		if n != 1 {
			t.Errorf("%s: sent %d times, want once: %s", id, n, body)
		}
	}
	if got := res.Get("retry_after").Int(); got != int64(pace.MaxRetryAfter/time.Second) {
		t.Errorf("envelope retry_after = %d, want the cap %d", got, int64(pace.MaxRetryAfter/time.Second))
	}
}
